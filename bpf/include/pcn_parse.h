/* Packet parsing. Every accessor re-checks bounds against data_end because the
 * verifier forgets them across helper calls that may move packet data. */
#ifndef PCN_PARSE_H
#define PCN_PARSE_H

#include "pcn_helpers.h"

#define PCN_ETH_P_ARP 0x0806
#define PCN_ETH_P_IP 0x0800

struct pcn_arp_eth {
    __be16 htype;
    __be16 ptype;
    u8 hlen;
    u8 plen;
    __be16 op;
    u8 sha[ETH_ALEN];
    __be32 spa;
    u8 tha[ETH_ALEN];
    __be32 tpa;
} __attribute__((packed));

#define PCN_ARP_REQUEST 1
#define PCN_ARP_REPLY 2

static __always_inline struct ethhdr *pcn_eth(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return NULL;
    return eth;
}

static __always_inline struct iphdr *pcn_ipv4(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + sizeof(struct ethhdr);
    if ((void *)(ip + 1) > data_end)
        return NULL;
    if (ip->ihl < 5)
        return NULL;
    return ip;
}

static __always_inline struct pcn_arp_eth *pcn_arp(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct pcn_arp_eth *arp = data + sizeof(struct ethhdr);
    if ((void *)(arp + 1) > data_end)
        return NULL;
    if (arp->htype != bpf_htons(1) || arp->ptype != bpf_htons(PCN_ETH_P_IP) ||
        arp->hlen != ETH_ALEN || arp->plen != 4)
        return NULL;
    return arp;
}

static __always_inline int pcn_mac_is_multicast(const u8 *mac)
{
    return mac[0] & 1;
}

static __always_inline int pcn_mac_eq(const u8 *a, const u8 *b)
{
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] &&
           a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

static __always_inline void pcn_mac_copy(u8 *dst, const u8 *src)
{
    __builtin_memcpy(dst, src, ETH_ALEN);
}

#endif

#ifndef PCN_PARSE_FLOW_H
#define PCN_PARSE_FLOW_H

/* The 5-tuple of an IPv4 packet as it travels (network byte order). ICMP echo
 * uses its identifier as both ports so that it can be tracked and translated
 * like a UDP flow. Also the key of session and NAT tables. */
struct pcn_flow {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    u8 proto;
    u8 pad[3];
};

struct pcn_l4info {
    u32 l4off;      /* offset of the L4 header from the start of the frame */
    u32 l4len;      /* bytes from l4off to the end of the IP datagram */
    u8 tcp_flags;
    u8 icmp_type;
    u8 is_fragment; /* a non-first fragment: no L4 header */
};

#define PCN_TCP_FIN 0x01
#define PCN_TCP_SYN 0x02
#define PCN_TCP_RST 0x04
#define PCN_TCP_ACK 0x10

/* Returns 0 for an IPv4 packet (flow filled), -1 otherwise. Ports stay 0 for
 * protocols without them and for non-first fragments. */
static __always_inline int pcn_parse_flow(struct __sk_buff *skb, struct pcn_flow *f,
                                          struct pcn_l4info *info)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return -1;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->ihl < 5)
        return -1;
    u32 ihl = ip->ihl * 4;
    f->saddr = ip->saddr;
    f->daddr = ip->daddr;
    f->proto = ip->protocol;
    f->sport = 0;
    f->dport = 0;
    info->l4off = sizeof(*eth) + ihl;
    info->l4len = bpf_ntohs(ip->tot_len) > ihl ? bpf_ntohs(ip->tot_len) - ihl : 0;
    info->tcp_flags = 0;
    info->icmp_type = 0;
    info->is_fragment = (ip->frag_off & bpf_htons(0x1fff)) != 0;
    if (info->is_fragment)
        return 0;
    void *l4 = (void *)ip + ihl;
    if (f->proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return -1;
        f->sport = th->source;
        f->dport = th->dest;
        info->tcp_flags = ((u8 *)th)[13];
    } else if (f->proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > data_end)
            return -1;
        f->sport = uh->source;
        f->dport = uh->dest;
    } else if (f->proto == IPPROTO_ICMP) {
        struct icmphdr *ih = l4;
        if ((void *)(ih + 1) > data_end)
            return -1;
        info->icmp_type = ih->type;
        if (ih->type == ICMP_ECHO || ih->type == ICMP_ECHOREPLY) {
            f->sport = ih->un.echo.id;
            f->dport = ih->un.echo.id;
        }
    }
    return 0;
}

static __always_inline void pcn_flow_reverse(const struct pcn_flow *f, struct pcn_flow *r)
{
    r->saddr = f->daddr;
    r->daddr = f->saddr;
    r->sport = f->dport;
    r->dport = f->sport;
    r->proto = f->proto;
    r->pad[0] = r->pad[1] = r->pad[2] = 0;
}

#endif
