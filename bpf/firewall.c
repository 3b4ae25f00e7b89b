/* firewall: a transparent cube with ordered rules (first match wins), a
 * default action, per-rule hit counters and, optionally, replies of the
 * connections it allowed let through whatever the rules say.
 *
 * Classification is a Linear Bit Vector Search (Lakshman and Stiliadis,
 * SIGCOMM '98; the scheme of Polycube's pcn-firewall): rule i is bit i of a
 * vector. One lookup per field (LPM for the source and destination addresses
 * and for the source and destination ports, hash for the protocol) gives the
 * vector of the rules whose condition on that field the packet meets; the
 * AND of the vectors holds the rules it matches, and its lowest set bit is
 * the first match. Per packet: four LPM and six hash lookups (the fields'
 * vectors, the actions') and one 64-bit AND per field for each word up to
 * the first match, at most 160 words: no loop walks the rules, and a rule
 * costs its field conditions nothing at run time. The agent computes the
 * vectors (operator/pcn_agent/dataplane/cubes/fwvectors.py explains them).
 * The verifier walks the GENERIC shape (10 240 rules, ports, tracking) in
 * about 350 000 instructions, a third of its limit.
 *
 * Rule sets change atomically: the agent writes the new vectors and LPM
 * entries under a new generation (part of every key), then switches the
 * instance's config to it in one update; a packet reads the generation once,
 * so it sees the old rule set or the new one, never a mix.
 *
 * Fragments are judged by their datagram (pcn_frag.h): when rules look at
 * ports (or replies are tracked), the first fragment's verdict is recorded
 * and applied to the later ones, which carry no ports; a first fragment too
 * short for its L4 header, a later one overlapping that header, or one whose
 * first fragment this firewall has not judged are dropped
 * (PCN_DROP_FRAGMENT). Rules without ports judge every fragment by its
 * addresses and protocol, like any packet.
 *
 * Compiled per rule-set shape: FW_MAX_RULES bounds the loop over vector words
 * (a firewall of 10 rules ANDs one word, the verifier sees one iteration),
 * FW_NEED_L4 is 0 when no rule looks at ports, so such a firewall never
 * parses L4, and FW_TRACK 1 adds the reply tracking. The agent swaps a
 * recompiled program into the instance's slot of the program array in one
 * update when the shape changes. */
#include "pcn_chain.h"
#include "pcn_parse.h"
#include "pcn_frag.h"
#include "pcn_ct.h"

#ifndef FW_MAX_RULES
#define FW_MAX_RULES 1
#endif
#ifndef FW_NEED_L4
#define FW_NEED_L4 1
#endif
#ifndef FW_TRACK
#define FW_TRACK 0
#endif
#if FW_TRACK && !FW_NEED_L4
#error "FW_TRACK needs FW_NEED_L4: connections are keyed by ports"
#endif

/* The vectors' size is the same in every specialisation: they live in one
 * pinned map that all of them share. 160 words: 10 240 rules. */
#define FW_CAP_WORDS 160
#define FW_WORDS_OF(n) (((n) + 63) / 64)
#define FW_WORDS (FW_WORDS_OF(FW_MAX_RULES) < FW_CAP_WORDS ? FW_WORDS_OF(FW_MAX_RULES) : FW_CAP_WORDS)

#define FW_ALLOW 0
#define FW_DROP 1

/* the field a vector or an LPM entry belongs to */
#define FW_F_SRC 0
#define FW_F_DST 1
#define FW_F_SPORT 2
#define FW_F_DPORT 3
#define FW_F_PROTO 4
#define FW_F_ACTION 5 /* bit i set: rule i drops */
#define FW_PROTO_OTHER 256 /* the protocol vector of protocols no rule names */

/* hit counter indexes past the rules' (pcn_frag_val.rule is 16 bits) */
#define FW_IDX_DEFAULT 0xffff
#define FW_IDX_REPLY 0xfffe

/* fw_cfg.flags */
#define FW_CFG_ALLOW_REPLIES 1

/* The generation and the field precede the value so that one trie serves
 * every instance, generation and field: entries are always at least 96 bits
 * long, and a lookup never strays into another's. */
struct fw_lpm_key {
    u32 prefixlen; /* 96 + the value's significant bits */
    u32 inst;
    u32 gen;
    u32 field;
    __be32 value;  /* an address, or a port in the upper 16 bits */
};

struct fw_vec_key {
    u32 inst;
    u32 gen;
    u32 field;
    u32 id; /* from the LPM entry; the protocol number for FW_F_PROTO */
};

struct fw_vec {
    u64 w[FW_CAP_WORDS];
};

struct fw_hit_key {
    u32 inst;
    u32 idx; /* rule index, FW_IDX_DEFAULT or FW_IDX_REPLY */
};

struct fw_cfg {
    u32 gen;
    u32 n_rules;
    u32 default_action;
    u32 flags;
};

BPF_TABLE_PINNED("lpm_trie", struct fw_lpm_key, u32, fw_lpm, 1048576, PCN_PIN("fw_lpm"),
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct fw_vec_key, struct fw_vec, fw_vecs, 262144, PCN_PIN("fw_vecs"),
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", u32, struct fw_cfg, fw_conf, PCN_MAX_CUBES, PCN_PIN("fw_conf"));
/* created by the agent for every rule of a rule set, so the packet path only
 * increments */
BPF_TABLE_PINNED("percpu_hash", struct fw_hit_key, u64, fw_rule_hits, 1048576,
                 PCN_PIN("fw_rule_hits"), BPF_F_NO_PREALLOC);
/* the connections allowed, by instance (pcn_ct.h scope); LRU: the oldest go.
 * Declared in every specialisation so that they all share one map. */
BPF_TABLE_PINNED("lru_hash", struct pcn_ct_key, struct pcn_ct, fw_ct, 65536, PCN_PIN("fw_ct"));

static __always_inline void fw_hit(u32 inst, u32 idx)
{
    struct fw_hit_key k = {.inst = inst, .idx = idx};
    u64 *c = fw_rule_hits.lookup(&k);
    if (c)
        (*c)++;
}

static __always_inline int fw_verdict(struct __sk_buff *skb, u32 action)
{
    if (action == FW_DROP)
        return pcn_filter_drop(skb, PCN_DROP_FILTERED);
    return pcn_pass(skb);
}

static __always_inline struct fw_vec *fw_vec_get(u32 inst, u32 gen, u32 field, u32 id)
{
    struct fw_vec_key k = {.inst = inst, .gen = gen, .field = field, .id = id};
    return fw_vecs.lookup(&k);
}

static __always_inline struct fw_vec *fw_vec_lpm(u32 inst, u32 gen, u32 field, __be32 value)
{
    struct fw_lpm_key k = {.prefixlen = 96 + 32, .inst = inst, .gen = gen, .field = field,
                           .value = value};
    u32 *id = fw_lpm.lookup(&k);
    if (!id)
        return NULL;
    return fw_vec_get(inst, gen, field, *id);
}

/* The index of the lowest set bit of w (w != 0), by halving: six steps, no
 * table (BCC has no read-only data section for a de Bruijn table) and no
 * branch for the verifier to follow. */
static __always_inline u32 fw_ctz64(u64 w)
{
    u32 n = 0, z;
    z = !(w & 0xffffffffULL) << 5; n += z; w >>= z;
    z = !(w & 0xffffULL) << 4; n += z; w >>= z;
    z = !(w & 0xffULL) << 3; n += z; w >>= z;
    z = !(w & 0xfULL) << 2; n += z; w >>= z;
    z = !(w & 0x3ULL) << 1; n += z; w >>= z;
    z = !(w & 0x1ULL); n += z;
    return n;
}

/* The first rule the packet matches (its index) and its action in *action;
 * FW_IDX_DEFAULT, *action untouched, when none does. A missing vector is an
 * empty one. The caller must not branch on the index: each word the loop can
 * leave from gives it another range, and a branch on it would make the
 * verifier walk the rest of the program once per word (past its limit). */
static __always_inline u32 fw_classify(u32 inst, u32 gen, u32 n_rules, __be32 saddr,
                                       __be32 daddr, u8 proto, u16 sport, u16 dport,
                                       u32 *action)
{
    struct fw_vec *vs = fw_vec_lpm(inst, gen, FW_F_SRC, saddr);
    if (!vs)
        return FW_IDX_DEFAULT;
    struct fw_vec *vd = fw_vec_lpm(inst, gen, FW_F_DST, daddr);
    if (!vd)
        return FW_IDX_DEFAULT;
    struct fw_vec *vp = fw_vec_get(inst, gen, FW_F_PROTO, proto);
    if (!vp)
        vp = fw_vec_get(inst, gen, FW_F_PROTO, FW_PROTO_OTHER);
    if (!vp)
        return FW_IDX_DEFAULT;
#if FW_NEED_L4
    struct fw_vec *vsp = fw_vec_lpm(inst, gen, FW_F_SPORT, bpf_htonl((u32)sport << 16));
    if (!vsp)
        return FW_IDX_DEFAULT;
    struct fw_vec *vdp = fw_vec_lpm(inst, gen, FW_F_DPORT, bpf_htonl((u32)dport << 16));
    if (!vdp)
        return FW_IDX_DEFAULT;
#endif
    u32 words = FW_WORDS_OF(n_rules);
    /* bounded by the compile-time FW_WORDS for the verifier, by the rule
     * count at run time: the words past it are zero anyway */
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < FW_WORDS; i++) {
        if (i >= words)
            break;
        u64 w = vs->w[i] & vd->w[i] & vp->w[i];
#if FW_NEED_L4
        w &= vsp->w[i] & vdp->w[i];
#endif
        if (!w)
            continue;
        u32 bit = fw_ctz64(w);
        struct fw_vec *va = fw_vec_get(inst, gen, FW_F_ACTION, 0);
        *action = va && ((va->w[i] >> bit) & 1) ? FW_DROP : FW_ALLOW;
        return i * 64 + bit;
    }
    return FW_IDX_DEFAULT;
}

int firewall_rx(struct __sk_buff *skb)
{
    u32 inst = pcn_meta_instance(skb);
    struct fw_cfg *cfg = fw_conf.lookup(&inst);
    if (!cfg)
        return pcn_pass(skb);
    u32 gen = cfg->gen;
    u32 n = cfg->n_rules;
    u32 dflt = cfg->default_action;
    u32 flags = cfg->flags;

    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return pcn_pass(skb);
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return pcn_pass(skb); /* rules are IPv4; ARP must flow for IPv4 to work */
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return pcn_filter_drop(skb, PCN_DROP_PARSE);
    __be32 saddr = ip->saddr, daddr = ip->daddr;
    u8 proto = ip->protocol;
    u16 sport = 0, dport = 0;
    u32 hit = FW_IDX_DEFAULT;
    u32 action = dflt;
#if FW_NEED_L4
    struct pcn_flow f = {};
    struct pcn_l4info info = {};
    int parsed = pcn_parse_flow(skb, &f, &info);
    if (parsed == PCN_PARSE_SHORT && info.first_fragment)
        return pcn_filter_drop(skb, PCN_DROP_FRAGMENT); /* tiny: RFC 1858 */
    if (info.is_fragment) {
        u64 now = bpf_ktime_get_ns();
        struct pcn_frag_val *v = pcn_frag_overlaps(&f, &info)
                                     ? NULL
                                     : pcn_frag_lookup(inst, &f, &info, now);
        if (!v)
            return pcn_filter_drop(skb, PCN_DROP_FRAGMENT);
        fw_hit(inst, v->rule);
        return fw_verdict(skb, v->verdict);
    }
    if (parsed == PCN_PARSE_OK &&
        (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP)) {
        sport = bpf_ntohs(f.sport);
        dport = bpf_ntohs(f.dport);
    }
#endif
#if FW_TRACK
    u64 now = bpf_ktime_get_ns();
    int track = (flags & FW_CFG_ALLOW_REPLIES) && parsed == PCN_PARSE_OK;
    u8 tflags = proto == IPPROTO_TCP ? info.tcp_flags : 0;
    struct pcn_ct_key ck = {};
    int src_is_a = pcn_ct_key_of(inst, &f, &ck);
    struct pcn_ct *c = track ? fw_ct.lookup(&ck) : NULL;
    if (c) {
        int tcp_start = proto == IPPROTO_TCP &&
                        (tflags & (PCN_TCP_SYN | PCN_TCP_ACK | PCN_TCP_RST)) == PCN_TCP_SYN;
        if (!pcn_ct_live(c, proto, now) || (tcp_start && pcn_ct_closed(c)))
            c = NULL; /* over: this packet starts anew */
    }
    if (c && !pcn_ct_from_orig(c, src_is_a)) {
        /* a reply of a connection allowed here: the rules judge only openers */
        pcn_ct_observe(c, 0, tflags, now);
        hit = FW_IDX_REPLY;
        action = FW_ALLOW;
    } else {
        hit = fw_classify(inst, gen, n, saddr, daddr, proto, sport, dport, &action);
        if (track && action == FW_ALLOW) {
            if (c) {
                pcn_ct_observe(c, 1, tflags, now);
            } else {
                struct pcn_ct nc = {.seen_ns = now, .ref = hit};
                nc.flags = pcn_ct_next_flags(src_is_a ? PCN_CTF_ORIG_A : 0, 1, tflags);
                fw_ct.update(&ck, &nc);
            }
        }
    }
#else
    (void)flags;
    hit = fw_classify(inst, gen, n, saddr, daddr, proto, sport, dport, &action);
#endif
#if FW_NEED_L4
    if (info.first_fragment) /* the later fragments get the same verdict */
        pcn_frag_record(inst, &f, &info, action, hit, bpf_ktime_get_ns());
#endif
    fw_hit(inst, hit);
    return fw_verdict(skb, action);
}
