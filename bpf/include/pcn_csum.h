/* Checksum maintenance. Incremental updates (RFC 1624): through the kernel
 * helpers where the skb's own checksum state must follow (L4 checksums of
 * CHECKSUM_PARTIAL/COMPLETE skbs from veths), in place for the IP header's,
 * which no skb checksum state depends on. */
#ifndef PCN_CSUM_H
#define PCN_CSUM_H

#include "pcn_helpers.h"

#define PCN_IP_CSUM_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, check))

/* Decrement the TTL of a header the program may write in place (bounds
 * checked by the caller), as a router forwarding it does. TTL and protocol
 * share one 16-bit word of the header checksum: the TTL going down by one
 * takes 0x0100 off that word, so the checksum (its one's complement) goes up
 * by 0x0100 with the end-around carry (RFC 1624 eqn. 3; RFC 1812 5.3.1; the
 * same arithmetic as Linux's ip_decrease_ttl). Written directly rather than
 * through bpf_skb_store_bytes and bpf_l3_csum_replace: two helper calls on
 * every forwarded packet, and the helpers' generic paths were measurable in
 * perf on the cross-node path (issue 13). The skb's own checksum state is
 * untouched either way: the header's sum over both words is unchanged, so a
 * CHECKSUM_COMPLETE value stays right, and CHECKSUM_PARTIAL covers L4 only. */
static __always_inline void pcn_ipv4_dec_ttl(struct iphdr *ip)
{
    u32 check = (u32)ip->check + (u32)bpf_htons(0x0100);
    ip->check = (__sum16)(check + (check >= 0xffff));
    ip->ttl--;
}

/* Fold a 32-bit one's-complement sum. */
static __always_inline u16 pcn_csum_fold(u32 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

#endif
