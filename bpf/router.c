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
 * swapped, so the asker reassembles a whole reply. */
#include "pcn_chain.h"
#include "pcn_parse.h"
#include "pcn_frag.h"
#include "pcn_csum.h"
#include "pcn_slowpath.h"

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

    struct router_neigh_key nk = {.cube = cube, .ip = nh};
    struct router_neigh *n = router_neigh.lookup(&nk);
    if (!n) {
        if (pcn_slowpath_send(skb, PCN_SLOW_ARP_MISS, cube, in_port, out_port, nh, 1) < 0)
            return pcn_drop(skb, in_port, cube, PCN_DROP_SLOWPATH);
        return TC_ACT_SHOT; /* user space holds the copy */
    }
    u8 dmac[ETH_ALEN];
    pcn_mac_copy(dmac, n->mac);

    struct pcn_port *op = pcn_ports.lookup(&out_port);
    if (!op)
        return pcn_drop(skb, in_port, cube, PCN_DROP_NO_PORT);
    u8 smac[ETH_ALEN];
    pcn_mac_copy(smac, op->mac);

    if (pcn_ipv4_dec_ttl(skb, ip) < 0)
        return pcn_drop(skb, in_port, cube, PCN_DROP_PARSE);
    eth = pcn_eth(skb); /* helpers above may have moved packet data */
    if (!eth)
        return pcn_drop(skb, in_port, cube, PCN_DROP_PARSE);
    pcn_mac_copy(eth->h_dest, dmac);
    pcn_mac_copy(eth->h_source, smac);
    return pcn_send(skb, out_port);
}
