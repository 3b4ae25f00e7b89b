/* Capture filters: a tcpdump-like expression compiled by the agent
 * (pcn_crds.capfilter) into a small program of match terms, kept in a map and
 * run here in a bounded loop. The program is data, never C text: changing a
 * filter writes map entries and compiles nothing.
 *
 * Each instruction tests one field, `lo <= (field & mask) <= hi` in host byte
 * order, and jumps to `jt` or `jf`: a later instruction, or CAP_ACCEPT /
 * CAP_REJECT. Jumps only go forward (the compiler guarantees it and the loop
 * stops on anything else), so CAP_MAX_INSNS steps evaluate any program: the
 * verifier sees one bounded loop whatever the expression.
 *
 * A field a frame does not have (addresses of an ARP frame, ports of ICMP or
 * of a later fragment) fails every test on it, as in pcap-filter(7). */
#ifndef PCN_CAPFILTER_H
#define PCN_CAPFILTER_H

#include "pcn_parse.h"

#define CAP_MAX_INSNS 64 /* pcn_crds.capfilter.MAX_INSNS */
#define CAP_ACCEPT 0xffff
#define CAP_REJECT 0xfffe

#define CAP_F_ETHERTYPE 0
#define CAP_F_PROTO 1
#define CAP_F_SRC_IP 2
#define CAP_F_DST_IP 3
#define CAP_F_SPORT 4
#define CAP_F_DPORT 5
#define CAP_F_COUNT 6

struct cap_insn {
    u8 field;
    u8 pad;
    u16 jt;
    u16 jf;
    u16 pad2;
    u32 mask;
    u32 lo;
    u32 hi;
};

/* The frame's fields in host order; `valid` has bit CAP_F_x set for each
 * field the frame has. */
struct cap_fields {
    u32 v[CAP_F_COUNT];
    u32 valid;
};

static __always_inline void capfilter_fields(struct __sk_buff *skb, struct cap_fields *out)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    out->valid = 0;
    if ((void *)(eth + 1) > data_end)
        return;
    out->v[CAP_F_ETHERTYPE] = bpf_ntohs(eth->h_proto);
    out->valid = 1 << CAP_F_ETHERTYPE;
    struct pcn_flow f = {};
    struct pcn_l4info info = {};
    int parsed = pcn_parse_flow(skb, &f, &info);
    if (parsed == PCN_PARSE_NOT_IPV4)
        return;
    out->v[CAP_F_PROTO] = f.proto;
    out->v[CAP_F_SRC_IP] = bpf_ntohl(f.saddr);
    out->v[CAP_F_DST_IP] = bpf_ntohl(f.daddr);
    out->valid |= (1 << CAP_F_PROTO) | (1 << CAP_F_SRC_IP) | (1 << CAP_F_DST_IP);
    /* pcn_parse_flow gives ICMP echoes their identifier as "ports": tcpdump's
     * `port` means TCP, UDP or SCTP only */
    if (parsed == PCN_PARSE_OK && !info.is_fragment &&
        (f.proto == IPPROTO_TCP || f.proto == IPPROTO_UDP || f.proto == IPPROTO_SCTP)) {
        out->v[CAP_F_SPORT] = bpf_ntohs(f.sport);
        out->v[CAP_F_DPORT] = bpf_ntohs(f.dport);
        out->valid |= (1 << CAP_F_SPORT) | (1 << CAP_F_DPORT);
    }
}

static __always_inline int capfilter_test(const struct cap_insn *in, const struct cap_fields *fl)
{
    u32 field = in->field;
    if (field >= CAP_F_COUNT || !(fl->valid & (1 << field)))
        return 0;
    u32 v = fl->v[field] & in->mask;
    return v >= in->lo && v <= in->hi;
}

#endif
