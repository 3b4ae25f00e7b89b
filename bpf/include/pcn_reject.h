/* Rejecting a connection the way kube-proxy does: TCP RST for a SYN, ICMP
 * port unreachable for UDP (and for an echo request: nftables' plain
 * "reject"). The packet itself is turned into the answer and sent back where
 * it came from. The ICMP error builder also serves the router's
 * "fragmentation needed" (router.c). */
#ifndef PCN_REJECT_H
#define PCN_REJECT_H

#include "pcn_helpers.h"
#include "pcn_parse.h"
#include "pcn_csum.h"
#include "pcn_chain.h"

/* The most an ICMP error built here quotes after the IP header (a multiple
 * of 4: the checksum helper works in 32-bit words). */
#define PCN_ICMP_QUOTE_MAX 64

static __always_inline void pcn_swap_macs(struct ethhdr *eth)
{
    u8 tmp[ETH_ALEN];
    pcn_mac_copy(tmp, eth->h_dest);
    pcn_mac_copy(eth->h_dest, eth->h_source);
    pcn_mac_copy(eth->h_source, tmp);
}

/* SYN -> RST|ACK in place. The options and length stay, so every checksum
 * change is incremental and valid whether the sender's checksum was complete
 * or partial. Returns 0 when the packet now is the answer. */
static __always_inline int pcn_reject_tcp(struct __sk_buff *skb, const struct pcn_l4info *info)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return -1;
    struct tcphdr *th = data + info->l4off;
    if (info->l4off > 80 || (void *)(th + 1) > data_end)
        return -1;
    if ((info->tcp_flags & (PCN_TCP_SYN | PCN_TCP_ACK | PCN_TCP_RST)) != PCN_TCP_SYN)
        return -1; /* only a connection attempt gets an answer */
    if (info->l4len != th->doff * 4)
        return -1; /* SYN with data: rare, just drop it */

    __be32 a = ip->saddr;
    ip->saddr = ip->daddr;
    ip->daddr = a;
    __be16 p = th->source;
    th->source = th->dest;
    th->dest = p;
    pcn_swap_macs(eth);

    u32 csum_off = info->l4off + offsetof(struct tcphdr, check);
    __be32 old_seq = th->seq;
    __be32 old_ack = th->ack_seq;
    __be32 new_ack = bpf_htonl(bpf_ntohl(old_seq) + 1);
    __be32 zero = 0;
    u16 old_flags = *(u16 *)((u8 *)th + 12);
    u16 new_flags = old_flags;
    ((u8 *)&new_flags)[1] = PCN_TCP_RST | PCN_TCP_ACK;
    th->seq = 0;
    th->ack_seq = new_ack;
    *(u16 *)((u8 *)th + 12) = new_flags;
    bpf_l4_csum_replace(skb, csum_off, old_seq, zero, 4);
    bpf_l4_csum_replace(skb, csum_off, old_ack, new_ack, 4);
    bpf_l4_csum_replace(skb, csum_off, old_flags, new_flags, 2);
    return 0;
}

/* Turn the packet into an ICMP destination unreachable error (RFC 792) from
 * `saddr` to `daddr` with `code`, quoting its IP header and the first
 * `quote_l4` bytes after it (RFC 792's minimum is 8: the ports, or an echo's
 * identifier, all a receiver needs to find its socket). For code 4,
 * fragmentation needed, `mtu` is the next-hop MTU (RFC 1191); 0 otherwise.
 * The Ethernet addresses are swapped: the error goes back to the frame's
 * sender. The packet must have no IP options (`l4off` right after a 20-byte
 * header; quoting them is not worth it) and hold the whole quote. The
 * packet is cut down to the quote first, which also ends it being a GSO
 * packet. A CHECKSUM_PARTIAL packet (from a local stack: a veth, lo) keeps
 * that state, pointing into the quote: that only ever goes back through a
 * veth, whose receiver trusts it without checking, and the quote holds the
 * whole L4 header with its checksum field as long as `quote_l4` covers it
 * (the kernel refuses to cut a partial checksum's field off).
 * Returns 0 when the packet now is the error. */
static __always_inline int pcn_icmp_unreach(struct __sk_buff *skb, u32 l4off, __be32 saddr,
                                            __be32 daddr, u8 code, u16 mtu,
                                            const u32 quote_l4)
{
    if (l4off != sizeof(struct ethhdr) + sizeof(struct iphdr) || quote_l4 > PCN_ICMP_QUOTE_MAX ||
        quote_l4 % 4)
        return -1;
    u32 quote_end = sizeof(struct ethhdr) + sizeof(struct iphdr) + quote_l4;
    if (skb->len < quote_end)
        return -1;
    struct ethhdr eth_copy;
    if (bpf_skb_load_bytes(skb, 0, &eth_copy, sizeof(eth_copy)) < 0)
        return -1;
    if (bpf_skb_change_tail(skb, quote_end, 0) < 0)
        return -1;
    u32 outer = sizeof(struct iphdr) + sizeof(struct icmphdr);
    if (bpf_skb_adjust_room(skb, outer, BPF_ADJ_ROOM_MAC, 0) < 0)
        return -1;
    u32 total = quote_end + outer;

    struct {
        struct iphdr ip;
        struct icmphdr icmp;
    } hdr = {};
    hdr.ip.version = 4;
    hdr.ip.ihl = 5;
    hdr.ip.tot_len = bpf_htons(total - sizeof(struct ethhdr));
    hdr.ip.ttl = 64;
    hdr.ip.protocol = IPPROTO_ICMP;
    hdr.ip.saddr = saddr;
    hdr.ip.daddr = daddr;
    hdr.ip.check = pcn_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&hdr.ip, sizeof(hdr.ip), 0));
    hdr.icmp.type = ICMP_DEST_UNREACH;
    hdr.icmp.code = code;
    hdr.icmp.un.frag.mtu = bpf_htons(mtu);

    u8 quote[sizeof(struct iphdr) + PCN_ICMP_QUOTE_MAX];
    u32 quote_len = sizeof(struct iphdr) + quote_l4; /* a constant once inlined */
    if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + outer, quote, quote_len) < 0)
        return -1;
    s64 sum = bpf_csum_diff(NULL, 0, (__be32 *)&hdr.icmp, sizeof(hdr.icmp), 0);
    sum = bpf_csum_diff(NULL, 0, (__be32 *)quote, quote_len, (u32)sum);
    hdr.icmp.checksum = pcn_csum_fold((u32)sum);

    u8 tmp[ETH_ALEN];
    pcn_mac_copy(tmp, eth_copy.h_dest);
    pcn_mac_copy(eth_copy.h_dest, eth_copy.h_source);
    pcn_mac_copy(eth_copy.h_source, tmp);
    if (bpf_skb_store_bytes(skb, 0, &eth_copy, sizeof(eth_copy), 0) < 0)
        return -1;
    if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &hdr, sizeof(hdr), 0) < 0)
        return -1;
    return 0;
}

/* UDP datagram (or echo request) -> ICMP port unreachable from the address
 * it was sent to, quoting its IP header and first 8 bytes. Returns 0 when
 * the packet now is the answer. */
static __always_inline int pcn_reject_unreach(struct __sk_buff *skb, const struct pcn_flow *f,
                                              const struct pcn_l4info *info)
{
    return pcn_icmp_unreach(skb, info->l4off, f->daddr, f->saddr, ICMP_PORT_UNREACH, 0, 8);
}

/* Turn a packet into its rejection: 0 when it now is the answer, -1 when it
 * gets none (not a connection attempt: a TCP segment other than a SYN, an
 * ICMP message other than an echo request, another protocol). */
static __always_inline int pcn_reject_answer(struct __sk_buff *skb, const struct pcn_flow *f,
                                             const struct pcn_l4info *info)
{
    if (f->proto == IPPROTO_TCP)
        return pcn_reject_tcp(skb, info);
    if (f->proto == IPPROTO_UDP || (f->proto == IPPROTO_ICMP && info->icmp_type == ICMP_ECHO))
        return pcn_reject_unreach(skb, f, info);
    return -1;
}

/* A transparent cube rejects the packet and sends the answer back out of the
 * netdev its port is peered with, where the packet came from (counted as a
 * drop, PCN_DROP_REJECTED). What gets no answer is dropped. */
static __always_inline int pcn_reject_back(struct __sk_buff *skb, const struct pcn_flow *f,
                                           const struct pcn_l4info *info)
{
    u32 port_id = pcn_meta_port(skb);
    pcn_count_drop(port_id, pcn_meta_instance(skb), PCN_DROP_REJECTED);
    if (pcn_reject_answer(skb, f, info) < 0)
        return TC_ACT_SHOT;
    struct pcn_port *p = pcn_ports.lookup(&port_id);
    if (!p || p->peer_kind != PCN_PEER_NETDEV)
        return TC_ACT_SHOT;
    return bpf_redirect(p->peer, 0);
}

#endif
