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
