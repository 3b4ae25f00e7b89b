/* Checksum maintenance. Incremental updates (RFC 1624) through the kernel
 * helpers so that CHECKSUM_PARTIAL/COMPLETE skbs from veths stay consistent. */
#ifndef PCN_CSUM_H
#define PCN_CSUM_H

#include "pcn_helpers.h"

#define PCN_IP_CSUM_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, check))
#define PCN_IP_TTL_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, ttl))

/* TTL and protocol share one 16-bit word of the header checksum. */
static __always_inline int pcn_ipv4_dec_ttl(struct __sk_buff *skb, struct iphdr *ip)
{
    u16 old = *(u16 *)&ip->ttl;
    u8 ttl = ip->ttl - 1;
    u16 new_word;
    if (bpf_skb_store_bytes(skb, PCN_IP_TTL_OFF, &ttl, 1, 0) < 0)
        return -1;
    new_word = old;
    ((u8 *)&new_word)[0] = ttl;
    return bpf_l3_csum_replace(skb, PCN_IP_CSUM_OFF, old, new_word, 2);
}

/* Fold a 32-bit one's-complement sum. */
static __always_inline u16 pcn_csum_fold(u32 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

#endif
