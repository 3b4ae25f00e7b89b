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

/* The 5-tuple of an IPv4 packet as it travels (network byte order). An ICMP
 * query (echo, timestamp) uses its identifier as both ports so that it can be
 * tracked and translated like a UDP flow. Also the key of session and NAT
 * tables. */
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
    u32 l4len;      /* bytes from l4off to the end of the IP datagram (of this fragment) */
    u8 tcp_flags;
    u8 icmp_type;
    u8 is_fragment; /* a non-first fragment: no L4 header */
    u8 first_fragment; /* the first fragment of a fragmented datagram (MF set, offset 0) */
    __be16 ip_id;   /* the IP identification: with the addresses and protocol, the datagram */
    u16 frag_off;   /* where a non-first fragment starts in its datagram's payload, bytes */
};

#define PCN_TCP_FIN 0x01
#define PCN_TCP_SYN 0x02
#define PCN_TCP_RST 0x04
#define PCN_TCP_ACK 0x10

#define PCN_IP_DF 0x4000
#define PCN_IP_MF 0x2000
#define PCN_IP_OFFMASK 0x1fff

/* pcn_parse_flow results */
#define PCN_PARSE_OK 0
#define PCN_PARSE_NOT_IPV4 (-1) /* not IPv4, or a broken IPv4 header: nothing filled */
#define PCN_PARSE_SHORT (-2)    /* IPv4 whose L4 header is cut short (see below) */

/* The bytes of L4 header a packet of `proto` must hold for its ports and
 * checksum (and, for TCP, its flags) to be read: the whole fixed header.
 * A first fragment carrying less is RFC 1858's "tiny fragment". */
static __always_inline u32 pcn_l4_min_len(u8 proto)
{
    if (proto == IPPROTO_TCP)
        return sizeof(struct tcphdr);
    if (proto == IPPROTO_UDP)
        return sizeof(struct udphdr);
    if (proto == IPPROTO_ICMP)
        return sizeof(struct icmphdr);
    if (proto == IPPROTO_SCTP)
        return 12; /* the common header: ports, verification tag, checksum */
    return 0;
}

/* ICMP queries that carry an identifier (RFC 792 echo and timestamp), where
 * the echo header keeps it: tracked and translated like a UDP flow whose two
 * ports are the identifier. */
static __always_inline int pcn_icmp_has_id(u8 type)
{
    return type == ICMP_ECHO || type == ICMP_ECHOREPLY || type == ICMP_TIMESTAMP ||
           type == ICMP_TIMESTAMPREPLY;
}

/* PCN_PARSE_OK for an IPv4 packet (flow filled), PCN_PARSE_NOT_IPV4 otherwise.
 * PCN_PARSE_SHORT when the L4 header of a TCP, UDP, ICMP or SCTP packet is not
 * all in the frame, or not all inside the datagram's length (Ethernet padding
 * is no header): the addresses, protocol and fragment fields are filled, the
 * ports stay 0. Ports stay 0 too for protocols without them and for non-first
 * fragments, whose ports only their datagram's first fragment holds
 * (pcn_frag.h). */
static __always_inline int pcn_parse_flow(struct __sk_buff *skb, struct pcn_flow *f,
                                          struct pcn_l4info *info)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return PCN_PARSE_NOT_IPV4;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->ihl < 5)
        return PCN_PARSE_NOT_IPV4;
    u32 ihl = ip->ihl * 4;
    u16 frag = bpf_ntohs(ip->frag_off);
    f->saddr = ip->saddr;
    f->daddr = ip->daddr;
    f->proto = ip->protocol;
    f->sport = 0;
    f->dport = 0;
    info->l4off = sizeof(*eth) + ihl;
    info->l4len = bpf_ntohs(ip->tot_len) > ihl ? bpf_ntohs(ip->tot_len) - ihl : 0;
    info->tcp_flags = 0;
    info->icmp_type = 0;
    info->is_fragment = (frag & PCN_IP_OFFMASK) != 0;
    info->first_fragment = !info->is_fragment && (frag & PCN_IP_MF);
    info->ip_id = ip->id;
    info->frag_off = (frag & PCN_IP_OFFMASK) * 8;
    if (info->is_fragment)
        return PCN_PARSE_OK;
    /* tot_len 0 on a whole packet is a GSO one past 64 KiB (BIG TCP): its
     * length is the skb's; no fragment is one */
    if ((ip->tot_len || info->first_fragment) && info->l4len < pcn_l4_min_len(f->proto))
        return PCN_PARSE_SHORT;
    void *l4 = (void *)ip + ihl;
    if (f->proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return PCN_PARSE_SHORT;
        f->sport = th->source;
        f->dport = th->dest;
        info->tcp_flags = ((u8 *)th)[13];
    } else if (f->proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > data_end)
            return PCN_PARSE_SHORT;
        f->sport = uh->source;
        f->dport = uh->dest;
    } else if (f->proto == IPPROTO_ICMP) {
        struct icmphdr *ih = l4;
        if ((void *)(ih + 1) > data_end)
            return PCN_PARSE_SHORT;
        info->icmp_type = ih->type;
        if (pcn_icmp_has_id(ih->type)) {
            f->sport = ih->un.echo.id;
            f->dport = ih->un.echo.id;
        }
    } else if (f->proto == IPPROTO_SCTP) {
        __be16 *ports = l4; /* the common header starts with them */
        if ((void *)(ports + 2) > data_end)
            return PCN_PARSE_SHORT;
        f->sport = ports[0];
        f->dport = ports[1];
    }
    return PCN_PARSE_OK;
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
