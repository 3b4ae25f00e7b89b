/* firewall: a transparent cube with ordered rules (first match wins) and a
 * default action; each rule counts its hits.
 *
 * Fragments are judged by their datagram (pcn_frag.h): when rules look at
 * ports, the first fragment's verdict is recorded and applied to the later
 * ones, which carry no ports; a first fragment too short for its L4 header,
 * a later one overlapping that header, or one whose first fragment this
 * firewall has not judged are dropped (PCN_DROP_FRAGMENT). Rules without
 * ports judge every fragment by its addresses and protocol, like any packet.
 *
 * Compiled per rule-set shape: FW_MAX_RULES bounds the match loop and
 * FW_NEED_L4 is 0 when no rule looks at ports, so such a firewall never
 * parses L4. The agent swaps a recompiled program into the instance's slot
 * of the program array in one update when the rules change. */
#include "pcn_chain.h"
#include "pcn_parse.h"
#include "pcn_frag.h"

#ifndef FW_MAX_RULES
#define FW_MAX_RULES 1
#endif
#ifndef FW_NEED_L4
#define FW_NEED_L4 1
#endif
#define FW_HITS_PER_INSTANCE 256 /* rules per firewall, +1 for the default action */

#define FW_ALLOW 0
#define FW_DROP 1

struct fw_rule {
    __be32 src;
    __be32 src_mask;
    __be32 dst;
    __be32 dst_mask;
    u16 sport_lo, sport_hi; /* host order; 0-65535 matches any */
    u16 dport_lo, dport_hi;
    u8 proto;  /* 0: any */
    u8 action;
    u16 pad;
};

struct fw_rule_key {
    u32 inst;
    u32 gen;  /* rules are written under a new generation, then switched to */
    u32 idx;
};

struct fw_cfg {
    u32 gen;
    u32 n_rules;
    u32 default_action;
    u32 pad;
};

BPF_TABLE_PINNED("hash", struct fw_rule_key, struct fw_rule, fw_rules, 65536,
                 PCN_PIN("fw_rules"));
BPF_TABLE_PINNED("hash", u32, struct fw_cfg, fw_cfgs, PCN_MAX_CUBES, PCN_PIN("fw_cfgs"));
BPF_TABLE_PINNED("percpu_array", u32, u64, fw_hits, PCN_MAX_CUBES * FW_HITS_PER_INSTANCE,
                 PCN_PIN("fw_hits"));

static __always_inline void fw_hit(u32 inst, u32 idx)
{
    u32 k = inst * FW_HITS_PER_INSTANCE + idx;
    u64 *c = fw_hits.lookup(&k);
    if (c)
        (*c)++;
}

static __always_inline int fw_verdict(struct __sk_buff *skb, u32 action)
{
    if (action == FW_DROP)
        return pcn_filter_drop(skb, PCN_DROP_FILTERED);
    return pcn_pass(skb);
}

int firewall_rx(struct __sk_buff *skb)
{
    u32 inst = pcn_meta_instance(skb);
    struct fw_cfg *cfg = fw_cfgs.lookup(&inst);
    if (!cfg)
        return pcn_pass(skb);
    u32 gen = cfg->gen;
    u32 n = cfg->n_rules;
    u32 dflt = cfg->default_action;

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
    u32 hit = FW_HITS_PER_INSTANCE - 1;
    u32 action = dflt;

#pragma clang loop unroll(disable)
    for (u32 i = 0; i < FW_MAX_RULES; i++) {
        if (i >= n)
            break;
        struct fw_rule_key k = {.inst = inst, .gen = gen, .idx = i};
        struct fw_rule *r = fw_rules.lookup(&k);
        if (!r)
            break;
        if ((saddr & r->src_mask) != r->src || (daddr & r->dst_mask) != r->dst)
            continue;
        if (r->proto && r->proto != proto)
            continue;
#if FW_NEED_L4
        if (sport < r->sport_lo || sport > r->sport_hi || dport < r->dport_lo ||
            dport > r->dport_hi)
            continue;
#endif
        hit = i;
        action = r->action;
        break;
    }
#if FW_NEED_L4
    if (info.first_fragment) /* the later fragments get the same verdict */
        pcn_frag_record(inst, &f, &info, action, hit, bpf_ktime_get_ns());
#endif
    fw_hit(inst, hit);
    return fw_verdict(skb, action);
}
