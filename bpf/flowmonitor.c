/* flowmonitor: a transparent cube that accounts every IPv4 flow it sees, by
 * 5-tuple and direction, and lets every frame pass unchanged.
 *
 * Per flow: packets, bytes, first and last packet time (CLOCK_MONOTONIC ns)
 * and the TCP flags of all its packets OR-ed together. Bytes are L3 bytes,
 * as conntrack accounts them (nf_conntrack_acct): the IP datagram, header
 * included, Ethernet header and padding not; a GSO frame is one packet of its
 * whole length, as it is one skb for conntrack too. ICMP echoes are keyed by their identifier
 * (in both port fields, as the session tables do); a fragment after the
 * first has no ports and is accounted to the flow with ports 0. Non-IPv4
 * frames are not accounted.
 *
 * The flow table is an LRU hash of FM_MAX_FLOWS entries: when it is full the
 * least recently used flow makes room, so memory is bounded whatever the
 * traffic. Each instance is compiled with its own bound and its own table,
 * pinned under FM_PIN so that a restarted agent keeps the counts; per
 * direction totals (for metrics of bounded cardinality) sit beside it. */
#include "pcn_chain.h"
#include "pcn_parse.h"

#ifndef FM_MAX_FLOWS
#define FM_MAX_FLOWS 1024
#endif
#ifndef FM_PIN
/* the agent always names the instance's table (fm_flows_<id>_<max>); this
 * name serves compiles of the bare type (tests of every cube's maps) */
#define FM_PIN "fm_flows"
#endif

struct fm_key {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    u8 proto;
    u8 dir; /* the hook: PCN_HOOK_INGRESS (from the pod) or PCN_HOOK_EGRESS (to it) */
    u16 pad;
};

struct fm_val {
    u64 packets;
    u64 bytes;
    u64 first_ns;
    u64 last_ns;
    u64 tcp_flags; /* 64 bits: the atomic OR BCC's target offers */
};

struct fm_total {
    u64 packets;
    u64 bytes;
};

BPF_TABLE_PINNED("lru_hash", struct fm_key, struct fm_val, fm_flows, FM_MAX_FLOWS,
                 PCN_PIN(FM_PIN));
BPF_PERCPU_ARRAY(fm_totals, struct fm_total, 2);

static __always_inline void fm_account(struct fm_key *k, u64 bytes, u32 flags, u64 now)
{
    struct fm_val *v = fm_flows.lookup(k);
    if (!v) {
        struct fm_val fresh = {.packets = 1, .bytes = bytes, .first_ns = now, .last_ns = now,
                               .tcp_flags = flags};
        if (fm_flows.insert(k, &fresh) == 0)
            return;
        v = fm_flows.lookup(k); /* another CPU created it meanwhile */
        if (!v)
            return;
    }
    __sync_fetch_and_add(&v->packets, 1);
    __sync_fetch_and_add(&v->bytes, bytes);
    if (flags)
        __sync_fetch_and_or(&v->tcp_flags, flags);
    v->last_ns = now; /* a racing CPU writes a time as recent: either will do */
}

/* The IP datagram's length: its header says it (Ethernet padding of a short
 * frame is not part of it, as conntrack, behind ip_rcv's trim, never sees
 * it); a GSO frame past 64 KiB (BIG TCP) says 0 and is the skb's length. */
static __always_inline u64 fm_l3_bytes(struct __sk_buff *skb)
{
    struct iphdr *ip = pcn_ipv4(skb);
    u64 frame = skb->len > sizeof(struct ethhdr) ? skb->len - sizeof(struct ethhdr) : 0;
    if (!ip || !ip->tot_len)
        return frame;
    u64 tot = bpf_ntohs(ip->tot_len);
    return tot < frame ? tot : frame;
}

int flowmonitor_rx(struct __sk_buff *skb)
{
    struct pcn_flow f = {};
    struct pcn_l4info info = {};
    if (pcn_parse_flow(skb, &f, &info) == PCN_PARSE_NOT_IPV4)
        return pcn_pass(skb);
    u32 dir = pcn_meta_hook(skb) & 1;
    struct fm_key k = {.saddr = f.saddr, .daddr = f.daddr, .sport = f.sport, .dport = f.dport,
                       .proto = f.proto, .dir = dir};
    u64 bytes = fm_l3_bytes(skb);
    fm_account(&k, bytes, f.proto == IPPROTO_TCP ? info.tcp_flags : 0, bpf_ktime_get_ns());
    struct fm_total *t = fm_totals.lookup(&dir);
    if (t) {
        t->packets++;
        t->bytes += bytes;
    }
    return pcn_pass(skb);
}
