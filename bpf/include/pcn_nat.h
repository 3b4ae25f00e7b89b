/* Address and port rewriting with incremental checksum updates. Works for skbs
 * whose L4 checksum is complete or left partial by the sender (the helpers
 * with BPF_F_PSEUDO_HDR keep both consistent). */
#ifndef PCN_NAT_H
#define PCN_NAT_H

#include "pcn_helpers.h"
#include "pcn_parse.h"
#include "pcn_csum.h"

#define PCN_IP_SADDR_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, saddr))
#define PCN_IP_DADDR_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, daddr))

static __always_inline int pcn_l4_csum_off(u8 proto, u32 l4off, u32 *off)
{
    if (proto == IPPROTO_TCP)
        *off = l4off + offsetof(struct tcphdr, check);
    else if (proto == IPPROTO_UDP)
        *off = l4off + offsetof(struct udphdr, check);
    else if (proto == IPPROTO_ICMP)
        *off = l4off + offsetof(struct icmphdr, checksum);
    else
        return -1;
    return 0;
}

/* Rewrite the source (is_src) or destination address and port of a packet.
 * For ICMP queries the "port" is the identifier, which sits in the same place
 * for either direction. A non-first fragment has no L4 header: only its
 * address changes (the L4 checksum, in the first fragment, covers the whole
 * datagram and is updated there). */
static __always_inline int pcn_nat_rewrite(struct __sk_buff *skb, const struct pcn_flow *f,
                                           const struct pcn_l4info *info, int is_src,
                                           __be32 new_ip, __be16 new_port)
{
    __be32 old_ip = is_src ? f->saddr : f->daddr;
    __be16 old_port = is_src ? f->sport : f->dport;
    u32 csum_off = 0;
    int has_l4 = !info->is_fragment && pcn_l4_csum_off(f->proto, info->l4off, &csum_off) == 0;
    u32 mangled0 = f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

    if (old_ip != new_ip) {
        if (has_l4 && f->proto != IPPROTO_ICMP &&
            bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip,
                                BPF_F_PSEUDO_HDR | mangled0 | sizeof(new_ip)) < 0)
            return -1;
        if (bpf_l3_csum_replace(skb, PCN_IP_CSUM_OFF, old_ip, new_ip, sizeof(new_ip)) < 0)
            return -1;
        if (bpf_skb_store_bytes(skb, is_src ? PCN_IP_SADDR_OFF : PCN_IP_DADDR_OFF, &new_ip,
                                sizeof(new_ip), 0) < 0)
            return -1;
    }
    if (has_l4 && old_port != new_port) {
        u32 port_off;
        if (f->proto == IPPROTO_ICMP)
            port_off = info->l4off + offsetof(struct icmphdr, un.echo.id);
        else /* source and dest are the first two 16-bit fields of TCP and UDP */
            port_off = info->l4off + (is_src ? 0 : 2);
        if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
                                mangled0 | sizeof(new_port)) < 0)
            return -1;
        if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0) < 0)
            return -1;
    }
    return 0;
}

#endif
