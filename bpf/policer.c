/* policer: a transparent cube that limits the rate of what crosses the hook it
 * is stacked on with a token bucket (pcn_tbf.h): a packet that finds enough
 * tokens for its length passes, any other is dropped (PCN_DROP_RATE). Policing,
 * not shaping: nothing is queued, so TCP sees losses and backs off, as with a
 * tc policer; the bucket's burst is what absorbs its sawtooth.
 *
 * Length: skb->len, the frame with its Ethernet header, as tc's tbf counts a
 * packet. A GSO packet counts its headers once (tbf's qdisc_pkt_len adds them
 * per segment), so TCP's goodput through a policer comes within about 1 % of
 * the rate instead of 4 %. A GSO packet is one packet of its whole length: it
 * never passes a bucket smaller than itself, which is why bursts are at least
 * 64 KiB.
 *
 * Scope: one bucket per port the instance is stacked on (a pod: scope `pod`),
 * or one for all of them (port 0: scope `shared`). The direction is the hook's:
 * a chain's ingress side polices traffic to the pod, egress traffic from it.
 *
 * An instance without a configuration, or a bucket that cannot be created
 * (map full), lets packets through: a rate limit is not a security boundary,
 * and failing closed would cut the pod off. */
#include "pcn_chain.h"
#include "pcn_tbf.h"

#define PLC_SCOPE_POD 0
#define PLC_SCOPE_SHARED 1
#define PLC_PASSED 0
#define PLC_DROPPED 1
#define PLC_MAX_BUCKETS 65536

struct plc_cfg {
    struct pcn_tbf_params tbf;
    u32 scope;
    u32 pad;
};

struct plc_key {
    u32 inst;
    u32 port; /* the port the instance is stacked on; 0 for a shared bucket */
};

struct plc_ctr {
    u64 packets;
    u64 bytes;
};

BPF_TABLE_PINNED("hash", u32, struct plc_cfg, plc_cfgs, PCN_MAX_CUBES, PCN_PIN("plc_cfgs"));
BPF_TABLE_PINNED("hash", struct plc_key, struct pcn_tbf, plc_buckets, PLC_MAX_BUCKETS,
                 PCN_PIN("plc_buckets"));
BPF_TABLE_PINNED("percpu_array", u32, struct plc_ctr, plc_ctrs, PCN_MAX_CUBES * 2,
                 PCN_PIN("plc_ctrs"));

static __always_inline void plc_count(u32 inst, u32 verdict, u32 bytes)
{
    u32 k = inst * 2 + verdict;
    struct plc_ctr *c = plc_ctrs.lookup(&k);
    if (c) {
        c->packets++;
        c->bytes += bytes;
    }
}

/* The bucket of `k`; a new one starts full, as a tbf qdisc does. */
static __always_inline struct pcn_tbf *plc_bucket(struct plc_key *k, struct plc_cfg *cfg,
                                                  u64 now)
{
    struct pcn_tbf *b = plc_buckets.lookup(k);
    if (b)
        return b;
    struct pcn_tbf fresh = {.tokens_fp = cfg->tbf.burst_fp, .last_ns = now};
    plc_buckets.insert(k, &fresh); /* another CPU may have won: then its bucket is used */
    return plc_buckets.lookup(k);
}

int policer_rx(struct __sk_buff *skb)
{
    u32 inst = pcn_meta_instance(skb);
    struct plc_cfg *cfg = plc_cfgs.lookup(&inst);
    if (!cfg)
        return pcn_pass(skb);
    struct plc_key k = {.inst = inst,
                        .port = cfg->scope == PLC_SCOPE_SHARED ? 0 : pcn_meta_port(skb)};
    u64 now = bpf_ktime_get_ns();
    u32 len = skb->len;
    struct pcn_tbf *b = plc_bucket(&k, cfg, now);
    if (!b) {
        plc_count(inst, PLC_PASSED, len);
        return pcn_pass(skb);
    }
    if (!pcn_tbf_take(b, &cfg->tbf, now, len)) {
        plc_count(inst, PLC_DROPPED, len);
        return pcn_filter_drop(skb, PCN_DROP_RATE);
    }
    plc_count(inst, PLC_PASSED, len);
    return pcn_pass(skb);
}
