/* ICMP errors about translated flows (RFC 5508 §4). An error quotes the
 * packet that caused it, as that packet looked where it failed: after our
 * translation. Unless the quote is translated back too, the sender cannot
 * match the error to its socket: a UDP client of a Service whose backend has
 * no listener would wait for a timeout instead of getting ECONNREFUSED, and a
 * masqueraded pod would never learn a smaller path MTU.
 *
 * The quoted packet went the opposite way of the error, so the session of the
 * error's direction is the one keyed by the quote's reverse flow; what that
 * session rewrites on one side of its packets is rewritten on the other side
 * of the quote, and on the same side of the error's own header. */
#ifndef PCN_ICMPERR_H
#define PCN_ICMPERR_H

#include "pcn_helpers.h"
#include "pcn_parse.h"
#include "pcn_nat.h"
#include "pcn_session.h"

/* Bounds the quote's offset for the verifier: Ethernet + the largest IPv4
 * header + the ICMP header. */
#define PCN_ICMPERR_MAX_OFF (sizeof(struct ethhdr) + 60 + sizeof(struct icmphdr))

struct pcn_icmp_quote {
    struct pcn_flow flow; /* the quoted packet's flow, as it was sent */
    u32 ip_off;           /* offset of the quoted IP header in the frame */
    u32 l4_off;           /* offset of its L4 header */
};

static __always_inline int pcn_icmp_is_error(u8 type)
{
    return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
           type == ICMP_PARAMETERPROB;
}

/* Returns 0 when `f` is an ICMP error quoting a TCP, UDP or ICMP query (echo,
 * timestamp) packet whose ports (or identifier) are in the quote. */
static __always_inline int pcn_icmp_quote_parse(struct __sk_buff *skb, const struct pcn_flow *f,
                                                const struct pcn_l4info *info,
                                                struct pcn_icmp_quote *q)
{
    if (f->proto != IPPROTO_ICMP || info->is_fragment || !pcn_icmp_is_error(info->icmp_type))
        return -1;
    u32 off = info->l4off + sizeof(struct icmphdr);
    if (off > PCN_ICMPERR_MAX_OFF)
        return -1;
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + off;
    if ((void *)(ip + 1) > data_end || ip->ihl < 5 || (ip->frag_off & bpf_htons(0x1fff)))
        return -1;
    u32 l4 = off + ip->ihl * 4;
    void *l4p = data + l4;
    /* 8 bytes: TCP/UDP ports, or the echo header with its identifier */
    if (l4p + 8 > data_end)
        return -1;
    q->flow.saddr = ip->saddr;
    q->flow.daddr = ip->daddr;
    q->flow.proto = ip->protocol;
    q->ip_off = off;
    q->l4_off = l4;
    if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) {
        __be16 *ports = l4p;
        q->flow.sport = ports[0];
        q->flow.dport = ports[1];
        return 0;
    }
    if (ip->protocol == IPPROTO_ICMP) {
        struct icmphdr *ih = l4p;
        if (!pcn_icmp_has_id(ih->type))
            return -1; /* no error about an error */
        q->flow.sport = ih->un.echo.id;
        q->flow.dport = ih->un.echo.id;
        return 0;
    }
    return -1;
}

/* The key of the session that covers the error's direction. */
static __always_inline void pcn_icmp_quote_key(const struct pcn_icmp_quote *q, struct pcn_flow *k)
{
    pcn_flow_reverse(&q->flow, k);
}

/* Rewrite one side of the quote. The quoted IP checksum is updated with it,
 * which leaves the ICMP checksum's sum unchanged; a port change is folded
 * into the ICMP checksum. The quoted L4 checksum is left as it is: it covers
 * a datagram the quote cuts short, and no receiver checks it. */
static __always_inline int pcn_icmp_quote_rewrite(struct __sk_buff *skb,
                                                  const struct pcn_l4info *info,
                                                  struct pcn_icmp_quote *q, int quote_src,
                                                  __be32 new_ip, __be16 new_port)
{
    __be32 old_ip = quote_src ? q->flow.saddr : q->flow.daddr;
    __be16 old_port = quote_src ? q->flow.sport : q->flow.dport;
    if (old_ip != new_ip) {
        u32 addr_off = q->ip_off + (quote_src ? offsetof(struct iphdr, saddr)
                                              : offsetof(struct iphdr, daddr));
        if (bpf_l3_csum_replace(skb, q->ip_off + offsetof(struct iphdr, check), old_ip, new_ip,
                                sizeof(new_ip)) < 0)
            return -1;
        if (bpf_skb_store_bytes(skb, addr_off, &new_ip, sizeof(new_ip), 0) < 0)
            return -1;
    }
    if (old_port != new_port) {
        u32 port_off = q->flow.proto == IPPROTO_ICMP
                           ? q->l4_off + offsetof(struct icmphdr, un.echo.id)
                           : q->l4_off + (quote_src ? 0 : 2);
        if (bpf_l4_csum_replace(skb, info->l4off + offsetof(struct icmphdr, checksum), old_port,
                                new_port, sizeof(new_port)) < 0)
            return -1;
        if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0) < 0)
            return -1;
    }
    if (quote_src) {
        q->flow.saddr = new_ip;
        q->flow.sport = new_port;
    } else {
        q->flow.daddr = new_ip;
        q->flow.dport = new_port;
    }
    return 0;
}

/* One rewrite of session `x` (its source side when is_src) applied to the
 * error: the quote's other side, and the error's own header on that side.
 * A source is replaced only when the error comes from the quoted peer itself;
 * an error from a router on the way keeps the router's address. */
static __always_inline int pcn_icmp_err_side(struct __sk_buff *skb, struct pcn_flow *f,
                                             const struct pcn_l4info *info,
                                             struct pcn_icmp_quote *q, int is_src,
                                             __be32 ip, __be16 port)
{
    __be32 was = is_src ? q->flow.daddr : q->flow.saddr;
    if (pcn_icmp_quote_rewrite(skb, info, q, !is_src, ip, port) < 0)
        return -1;
    __be32 outer = is_src ? f->saddr : f->daddr;
    if (outer != was || outer == ip)
        return 0;
    /* an ICMP error's "ports" are 0 in `f`: only the address changes */
    if (pcn_nat_rewrite(skb, f, info, is_src, ip, 0) < 0)
        return -1;
    if (is_src)
        f->saddr = ip;
    else
        f->daddr = ip;
    return 0;
}

/* Apply session `x` (with its optional second rewrite) to an ICMP error.
 * Each side is inlined with a constant `is_src`: with a variable one clang
 * picks a field by OR-ing the stack pointer, which the verifier refuses. */
static __always_inline int pcn_icmp_err_xlate(struct __sk_buff *skb, struct pcn_flow *f,
                                              const struct pcn_l4info *info,
                                              struct pcn_icmp_quote *q, const struct pcn_xlate *x)
{
    if (x->is_src) {
        if (pcn_icmp_err_side(skb, f, info, q, 1, x->ip, x->port) < 0)
            return -1;
        if (x->ip2 && pcn_icmp_err_side(skb, f, info, q, 0, x->ip2, x->port2) < 0)
            return -1;
    } else {
        if (pcn_icmp_err_side(skb, f, info, q, 0, x->ip, x->port) < 0)
            return -1;
        if (x->ip2 && pcn_icmp_err_side(skb, f, info, q, 1, x->ip2, x->port2) < 0)
            return -1;
    }
    return 0;
}

#endif
