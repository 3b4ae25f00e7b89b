/* router: IPv4 static routing between ports that carry an address and a MAC.
 * Next hops are resolved with ARP by the agent's slow path: a packet whose next
 * hop is unknown goes to user space, which asks, waits for the reply that this
 * program learns, and re-injects the packet.
 *
 * Fragments are routed like any packet: only the TTL (and the header
 * checksum) changes, and the route depends on the destination alone. Echo
 * requests to the router's own addresses are answered fragment by fragment
 * (pcn_frag.h): the first fragment turns into the reply's first fragment,
 * the later ones of the same request are sent back with the addresses
 * swapped, so the asker reassembles a whole reply.
 *
 * Path MTU: a packet larger than the MTU of the port it would leave by is
 * what a Linux router refuses in ip_forward (RFC 1191, RFC 1812 4.2.2.5 and
 * 5.2.6): with DF set it is answered with ICMP "fragmentation needed" and the
 * next-hop MTU, sent back through the port it came in by (where the
 * translations of the cubes stacked there are undone on the error's quote,
 * pcn_icmperr.h) and not rate-limited (Linux exempts it, icmpv4_mask_allow:
 * path MTU discovery must not stall; each error is smaller than the packet
 * that caused it). Without DF it must be fragmented, which tc cannot do: on
 * the node's NIC (a port shared with the host) the packet goes to the host
 * stack instead, whose forwarding path fragments it on its way back to the
 * router through the host link (a Kubernetes node forwards:
 * net.ipv4.ip_forward=1), and every later fragment of the same datagram
 * follows it, so that the host sees the whole datagram (a host with
 * conntrack reassembles it first); elsewhere it is dropped and counted
 * (PCN_DROP_TOO_BIG). Without the check the kernel drops such a packet
 * silently at the veth it is redirected to. */
#include "pcn_chain.h"
#include "pcn_parse.h"
#include "pcn_frag.h"
#include "pcn_csum.h"
#include "pcn_slowpath.h"
#include "pcn_reject.h"

struct router_route_key {
    u32 prefixlen; /* 32 (cube) + prefix length of dst */
    u32 cube;
    __be32 dst;
};

struct router_route {
    u32 port;          /* 0: unreachable, drop (Router.add_unreachable) */
    __be32 nexthop; /* 0: destination is directly connected */
};

struct router_neigh_key {
    u32 cube;
    __be32 ip;
};

struct router_neigh {
    u8 mac[ETH_ALEN];
    u16 pad;
    u32 port;
    u64 updated_ns;
};

struct router_addr_key {
    u32 cube;
    __be32 ip;
};

BPF_TABLE_PINNED("lpm_trie", struct router_route_key, struct router_route, router_routes,
                 16384, PCN_PIN("router_routes"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct router_neigh_key, struct router_neigh, router_neigh, 16384,
                 PCN_PIN("router_neigh"));
BPF_TABLE_PINNED("hash", struct router_addr_key, u32, router_addrs, 4096,
                 PCN_PIN("router_addrs"));
/* The MTU (bytes of IP datagram) of a port set by the agent, keyed by port
 * id: for a port peered with another cube's port, where no netdev tells it
 * (the pods' port: what it sends leaves through the bridge to the pods'
 * veths). A port without one that is peered with a netdev has that
 * netdev's MTU, read live from the kernel; one with neither is not checked. */
BPF_TABLE_PINNED("hash", u32, u32, router_mtus, PCN_MAX_PORTS, PCN_PIN("router_mtus"));

#define ROUTER_FRAG_TO_HOST 1 /* pcn_frag_val.verdict: the datagram goes to the host stack */
/* Bytes after the IP header that a "fragmentation needed" quotes: the 8 of
 * RFC 792 and more (RFC 1812 4.3.2.3 asks for as much as fits in 576), up to
 * a TCP header with 12 bytes of options, so that the checksum field of a
 * CHECKSUM_PARTIAL segment stays inside (pcn_icmp_unreach). Any packet too
 * big for an MTU of at least 68 (RFC 791's minimum) holds that much. */
#define ROUTER_ICMP_QUOTE 32

static __always_inline void router_learn(u32 cube, __be32 ip, const u8 *mac, u32 port)
{
    struct router_neigh_key k = {.cube = cube, .ip = ip};
    struct router_neigh v = {.port = port, .updated_ns = bpf_ktime_get_ns()};
    pcn_mac_copy(v.mac, mac);
    router_neigh.update(&k, &v);
}

static __always_inline int router_arp(struct __sk_buff *skb, u32 cube, u32 in_port,
                                      struct pcn_port *p)
{
    struct ethhdr *eth = pcn_eth(skb);
    struct pcn_arp_eth *arp = pcn_arp(skb);
    if (!eth || !arp)
        return pcn_drop(skb, in_port, cube, PCN_DROP_PARSE);
    /* On a port sharing its netdev with the host (the node's NIC), the host
     * answers for the address; the router only listens, and every ARP frame
     * goes on to the host stack. */
    int shared = p->flags & PCN_PORT_HOST_SHARED;
    if (!p->ip || arp->tpa != p->ip)
        return shared ? TC_ACT_OK : TC_ACT_SHOT; /* someone else's question */

    __be32 sender = arp->spa;
    if (arp->op == bpf_htons(PCN_ARP_REPLY)) {
        router_learn(cube, sender, arp->sha, in_port);
        pcn_slowpath_send(skb, PCN_SLOW_NEIGH_LEARNED, cube, in_port, in_port, sender, 0);
        return shared ? TC_ACT_OK : TC_ACT_SHOT;
    }
    if (shared) {
        if (arp->op == bpf_htons(PCN_ARP_REQUEST))
            router_learn(cube, sender, arp->sha, in_port);
        return TC_ACT_OK;
    }
    if (arp->op != bpf_htons(PCN_ARP_REQUEST))
        return pcn_drop(skb, in_port, cube, PCN_DROP_UNSUPPORTED);

    /* The asker will talk to us next: remember it, as Linux does. */
    router_learn(cube, sender, arp->sha, in_port);
    u8 asker[ETH_ALEN];
    pcn_mac_copy(asker, arp->sha);
    arp->op = bpf_htons(PCN_ARP_REPLY);
    pcn_mac_copy(arp->tha, asker);
    arp->tpa = sender;
    pcn_mac_copy(arp->sha, p->mac);
    arp->spa = p->ip;
    pcn_mac_copy(eth->h_dest, asker);
    pcn_mac_copy(eth->h_source, p->mac);
    return pcn_send(skb, in_port);
}

/* Send a packet addressed to the router back to its sender: addresses and
 * MACs swapped (which leaves every checksum as it was). */
static __always_inline int router_reflect(struct __sk_buff *skb, u32 in_port, struct pcn_port *p,
                                          struct ethhdr *eth, struct iphdr *ip)
{
    __be32 src = ip->saddr;
    ip->saddr = ip->daddr;
    ip->daddr = src;
    u8 peer[ETH_ALEN];
    pcn_mac_copy(peer, eth->h_source);
    pcn_mac_copy(eth->h_dest, peer);
    pcn_mac_copy(eth->h_source, p->mac);
    return pcn_send(skb, in_port);
}

/* Echo requests to one of the router's own addresses (pods ping their gateway). */
static __always_inline int router_local(struct __sk_buff *skb, u32 cube, u32 in_port,
                                        struct pcn_port *p)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + sizeof(*eth);
    struct icmphdr *icmp = data + sizeof(*eth) + sizeof(*ip);
    if ((void *)(ip + 1) > data_end)
        return pcn_drop(skb, in_port, cube, PCN_DROP_PARSE);
    if (ip->ihl != 5 || ip->protocol != IPPROTO_ICMP)
        return pcn_drop(skb, in_port, cube, PCN_DROP_UNSUPPORTED);
    struct pcn_flow f = {.saddr = ip->saddr, .daddr = ip->daddr, .proto = IPPROTO_ICMP};
    struct pcn_l4info info = {};
    u16 frag = bpf_ntohs(ip->frag_off);
    info.ip_id = ip->id;
    info.is_fragment = (frag & PCN_IP_OFFMASK) != 0;
    info.first_fragment = !info.is_fragment && (frag & PCN_IP_MF);
    if (info.is_fragment) {
        /* no ICMP header here: the rest of a request whose first fragment
         * was answered, or nothing to answer */
        if (!pcn_frag_lookup(cube, &f, &info, bpf_ktime_get_ns()))
            return pcn_drop(skb, in_port, cube, PCN_DROP_FRAGMENT);
        return router_reflect(skb, in_port, p, eth, ip);
    }
    if ((void *)(icmp + 1) > data_end || icmp->type != ICMP_ECHO)
        return pcn_drop(skb, in_port, cube, PCN_DROP_UNSUPPORTED);
    if (info.first_fragment)
        pcn_frag_record(cube, &f, &info, 0, 0, bpf_ktime_get_ns());

    u16 old_type = *(u16 *)icmp;
    icmp->type = ICMP_ECHOREPLY;
    u16 new_type = *(u16 *)icmp;
    u32 off = sizeof(*eth) + sizeof(*ip) + offsetof(struct icmphdr, checksum);
    bpf_l4_csum_replace(skb, off, old_type, new_type, 2);
    /* the helper may have moved packet data: find the headers again */
    data = (void *)(long)skb->data;
    data_end = (void *)(long)skb->data_end;
    eth = data;
    ip = data + sizeof(*eth);
    if ((void *)(ip + 1) > data_end)
        return pcn_drop(skb, in_port, cube, PCN_DROP_PARSE);
    return router_reflect(skb, in_port, p, eth, ip);
}

/* The MTU of the port a packet is about to leave by (router_mtus), 0 when
 * unknown. For a netdev the kernel's own figure: bpf_check_mtu (5.12+)
 * reports the device's MTU whatever its verdict, so a changed NIC or VXLAN
 * MTU is followed at once; the comparison is router_fits', which also knows
 * GSO packets whose headers are not in the linear part. */
static __always_inline u32 router_port_mtu(struct __sk_buff *skb, u32 port_id,
                                           const struct pcn_port *op)
{
    u32 *configured = router_mtus.lookup(&port_id);
    if (configured)
        return *configured;
    if (op->peer_kind != PCN_PEER_NETDEV)
        return 0;
    u32 mtu = 0;
    if (bpf_check_mtu(skb, op->peer, &mtu, 0, 0) < 0)
        return 0; /* no such netdev (any more): the redirect fails anyway */
    return mtu;
}

/* The bytes of IP and L4 header each segment of a GSO packet carries (IP
 * options and TCP options included), 0 when they cannot be read. Read in
 * place: a GSO packet's headers are in its linear part (the sender's stack
 * built them there, GRO keeps them there), and router_rx runs on every GSO
 * packet a pod sends across nodes, where the three bpf_skb_load_bytes calls
 * this did before (each a helper call and a memcpy) were about 8 % of the
 * router's perf samples (issue 13). The copying helper stays for a packet
 * whose headers end past the linear part. */
static __always_inline u32 router_seg_hdrs(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + sizeof(struct ethhdr);
    u8 vihl, proto, doff;
    if ((void *)(ip + 1) <= data_end) {
        vihl = *(u8 *)ip;
        proto = ip->protocol;
    } else if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &vihl, 1) < 0 ||
               bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + offsetof(struct iphdr, protocol),
                                  &proto, 1) < 0) {
        return 0;
    }
    u32 hdrs = (vihl & 0xf) * 4;
    if (proto == IPPROTO_UDP)
        return hdrs + sizeof(struct udphdr); /* UDP GSO: gso_size bytes of payload per datagram */
    if (proto != IPPROTO_TCP)
        return hdrs;
    data = (void *)(long)skb->data; /* the helpers above may have moved packet data */
    data_end = (void *)(long)skb->data_end;
    u8 *off = data + sizeof(struct ethhdr) + hdrs + 12; /* TCP data offset, in words */
    if ((void *)(off + 1) <= data_end)
        doff = *off;
    else if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + hdrs + 12, &doff, 1) < 0)
        return 0;
    return hdrs + (doff >> 4) * 4;
}

/* Whether the packet fits `mtu` bytes of IP datagram, as Linux judges it
 * when forwarding (ip_exceeds_mtu, skb_gso_validate_network_len): its whole
 * length, or for a GSO packet (one GRO merged, or a local TSO sender's) that
 * of each segment it will be cut into: IP and L4 headers and gso_size bytes
 * of payload. */
static __always_inline int router_fits(struct __sk_buff *skb, u32 mtu)
{
    if (!mtu || skb->len <= sizeof(struct ethhdr) + mtu)
        return 1;
    u32 seg = skb->gso_size;
    if (!seg)
        return 0;
    u32 hdrs = router_seg_hdrs(skb);
    return hdrs && hdrs + seg <= mtu;
}

/* The packet is being handled on the ingress of the netdev of port `p`,
 * which the host stack shares (the node's NIC): TC_ACT_OK hands it to the
 * host as if no program had seen it. */
static __always_inline int router_on_host_netdev(struct __sk_buff *skb, const struct pcn_port *p)
{
    return (p->flags & PCN_PORT_HOST_SHARED) && p->peer_kind == PCN_PEER_NETDEV &&
           skb->ifindex == p->peer;
}

/* ICMP types Linux never answers with an error (icmp_send): errors, and
 * types past the last it knows. */
static __always_inline int router_icmp_no_error_about(u8 type)
{
    return type > NR_ICMP_TYPES || type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH ||
           type == ICMP_REDIRECT || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/* Whether an ICMP error may be sent about a packet (RFC 1122 3.2.2, RFC 1812
 * 4.3.2.7, as Linux's icmp_send): not about a later fragment, an ICMP error,
 * a frame not unicast to this port, a multicast or broadcast destination, or
 * a source that names no single host (0/8, 127/8, multicast, class E and
 * the limited broadcast). */
static __always_inline int router_may_answer(const struct pcn_port *p, const struct pcn_flow *f,
                                             const struct pcn_l4info *info,
                                             const u8 *frame_dst)
{
    u8 src = ((const u8 *)&f->saddr)[0];
    u8 dst = ((const u8 *)&f->daddr)[0];
    if (info->is_fragment || !pcn_mac_eq(frame_dst, p->mac))
        return 0;
    if (src == 0 || src == 127 || src >= 224 || dst >= 224)
        return 0;
    return f->proto != IPPROTO_ICMP || !router_icmp_no_error_about(info->icmp_type);
}

/* The MAC of the next hop towards `dst` when the route to it leaves by
 * `port` and the neighbour is known: -1 otherwise. */
static __always_inline int router_next_hop_mac(u32 cube, u32 port, __be32 dst, u8 *mac)
{
    struct router_route_key rk = {.prefixlen = 64, .cube = cube, .dst = dst};
    struct router_route *rt = router_routes.lookup(&rk);
    if (!rt || rt->port != port)
        return -1;
    struct router_neigh_key nk = {.cube = cube, .ip = rt->nexthop ? rt->nexthop : dst};
    struct router_neigh *n = router_neigh.lookup(&nk);
    if (!n)
        return -1;
    pcn_mac_copy(mac, n->mac);
    return 0;
}

/* A packet with DF set that does not fit the next hop's `mtu`: turned into
 * ICMP destination unreachable, fragmentation needed (type 3 code 4, RFC
 * 1191), from the address of the port it came in by to its source, and sent
 * back out of that port to the frame's sender. The node's own packets that
 * its lo hands to the host port (entry.c) carry no sender MAC: their error
 * goes to the next hop back to the node (the host link's far end) when it
 * is known. Counted as a drop either way. */
static __always_inline int router_frag_needed(struct __sk_buff *skb, u32 cube, u32 in_port,
                                              struct pcn_port *p, u32 mtu)
{
    pcn_count_drop(in_port, cube, PCN_DROP_TOO_BIG);
    struct pcn_flow f = {};
    struct pcn_l4info info = {};
    if (pcn_parse_flow(skb, &f, &info) != PCN_PARSE_OK)
        return TC_ACT_SHOT;
    struct ethhdr *eth = pcn_eth(skb);
    if (!eth || !router_may_answer(p, &f, &info, eth->h_dest))
        return TC_ACT_SHOT;
    u8 back[ETH_ALEN] = {};
    int no_sender = pcn_mac_eq(eth->h_source, back);
    if (no_sender && router_next_hop_mac(cube, in_port, f.saddr, back) < 0)
        return TC_ACT_SHOT;
    if (pcn_icmp_unreach(skb, info.l4off, p->ip, f.saddr, ICMP_FRAG_NEEDED,
                         mtu > 0xffff ? 0xffff : mtu, ROUTER_ICMP_QUOTE) < 0)
        return TC_ACT_SHOT;
    if (no_sender && bpf_skb_store_bytes(skb, 0, back, ETH_ALEN, 0) < 0)
        return TC_ACT_SHOT;
    return pcn_send(skb, in_port);
}

int router_rx(struct __sk_buff *skb)
{
    u32 in_port = pcn_meta_port(skb);
    struct pcn_port *p = pcn_ports.lookup(&in_port);
    if (!p)
        return pcn_drop(skb, in_port, 0, PCN_DROP_NO_PORT);
    u32 cube = p->cube_id;
    struct ethhdr *eth = pcn_eth(skb);
    if (!eth)
        return pcn_drop(skb, in_port, cube, PCN_DROP_PARSE);

    if (eth->h_proto == bpf_htons(PCN_ETH_P_ARP))
        return router_arp(skb, cube, in_port, p);
    if (!pcn_mac_is_multicast(eth->h_dest) && !pcn_mac_eq(eth->h_dest, p->mac))
        return TC_ACT_SHOT; /* a flooded copy meant for another host */
    if (eth->h_proto != bpf_htons(PCN_ETH_P_IP))
        return pcn_drop(skb, in_port, cube, PCN_DROP_UNSUPPORTED);

    struct iphdr *ip = pcn_ipv4(skb);
    if (!ip)
        return pcn_drop(skb, in_port, cube, PCN_DROP_PARSE);
    __be32 daddr = ip->daddr;

    if ((p->flags & PCN_PORT_HOST_SHARED) && daddr == p->ip)
        return TC_ACT_OK; /* the host's own traffic */
    struct router_addr_key ak = {.cube = cube, .ip = daddr};
    if (router_addrs.lookup(&ak))
        return router_local(skb, cube, in_port, p);

    if (ip->ttl <= 1)
        return pcn_drop(skb, in_port, cube, PCN_DROP_TTL);

    struct router_route_key rk = {.prefixlen = 64, .cube = cube, .dst = daddr};
    struct router_route *rt = router_routes.lookup(&rk);
    if (!rt || !rt->port) /* port 0: an unreachable route (no port has id 0) */
        return pcn_drop(skb, in_port, cube, PCN_DROP_NO_ROUTE);
    u32 out_port = rt->port;
    __be32 nh = rt->nexthop ? rt->nexthop : daddr;
    struct pcn_port *op = pcn_ports.lookup(&out_port);
    if (!op)
        return pcn_drop(skb, in_port, cube, PCN_DROP_NO_PORT);

    /* Path MTU (see the top of the file), before the neighbour is resolved:
     * what cannot leave need not wait for an ARP reply. */
    struct pcn_flow df = {.saddr = ip->saddr, .daddr = daddr, .proto = ip->protocol};
    struct pcn_l4info dinfo = {.ip_id = ip->id};
    u16 frag = bpf_ntohs(ip->frag_off);
    int host_netdev = router_on_host_netdev(skb, p);
    if (host_netdev && (frag & PCN_IP_OFFMASK)) {
        struct pcn_frag_val *fv = pcn_frag_lookup(cube, &df, &dinfo, bpf_ktime_get_ns());
        if (fv && fv->verdict == ROUTER_FRAG_TO_HOST)
            return TC_ACT_OK; /* its first fragment went to the host stack */
    }
    u32 mtu = router_port_mtu(skb, out_port, op);
    if (!router_fits(skb, mtu)) {
        if (frag & PCN_IP_DF)
            return router_frag_needed(skb, cube, in_port, p, mtu);
        if (!host_netdev)
            return pcn_drop(skb, in_port, cube, PCN_DROP_TOO_BIG);
        if ((frag & PCN_IP_MF) && !(frag & PCN_IP_OFFMASK))
            pcn_frag_record(cube, &df, &dinfo, ROUTER_FRAG_TO_HOST, 0, bpf_ktime_get_ns());
        return TC_ACT_OK; /* the host forwards it, in fragments */
    }
    ip = pcn_ipv4(skb); /* the helpers above may have moved packet data */
    if (!ip)
        return pcn_drop(skb, in_port, cube, PCN_DROP_PARSE);

    struct router_neigh_key nk = {.cube = cube, .ip = nh};
    struct router_neigh *n = router_neigh.lookup(&nk);
    if (!n) {
        if (pcn_slowpath_send(skb, PCN_SLOW_ARP_MISS, cube, in_port, out_port, nh, 1) < 0)
            return pcn_drop(skb, in_port, cube, PCN_DROP_SLOWPATH);
        return TC_ACT_SHOT; /* user space holds the copy */
    }
    u8 dmac[ETH_ALEN];
    pcn_mac_copy(dmac, n->mac);
    u8 smac[ETH_ALEN];
    pcn_mac_copy(smac, op->mac);

    pcn_ipv4_dec_ttl(ip);
    eth = pcn_eth(skb);
    if (!eth)
        return pcn_drop(skb, in_port, cube, PCN_DROP_PARSE);
    pcn_mac_copy(eth->h_dest, dmac);
    pcn_mac_copy(eth->h_source, smac);
    return pcn_send_port(skb, out_port, op);
}
