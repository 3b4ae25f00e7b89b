/* Entry programs: the only programs attached to netdevs. One copy serves every
 * netdev of the agent: the ifindex finds the port, so attaching a pod compiles
 * nothing and adds one map entry. */
#include "pcn_chain.h"
#include "pcn_inject.h"
#include "pcn_parse.h"
#include "pcn_lb.h"
/* Not used here: declared so that the tables custom cubes (CubeTypes) share
 * exist from the runtime's start, before any of them compiles, and the agent
 * reads and writes them through this module. */
#include "pcn_cube_api.h"

int pcn_ingress(struct __sk_buff *skb)
{
    u32 ifindex = skb->ifindex;
    struct pcn_iface *ifc = pcn_ifaces.lookup(&ifindex);
    if (!ifc || ifc->kind == PCN_IFACE_LOOPBACK)
        return TC_ACT_OK; /* not a pcn netdev: the kernel stack keeps it */
    pcn_set_origin(skb, 1);
    if (ifc->kind == PCN_IFACE_INJECT)
        return pcn_inject(skb);
    return pcn_port_ingress(skb, ifc->port);
}

/* The node's own connection to a service on one of its addresses (a NodePort
 * on the node IP: kube-proxy serves it to the node too) never leaves the
 * node's stack: it goes out through loopback and straight back in. Such a
 * packet, or one of a connection translated before, enters the router's host
 * port (`host_port`) instead, as if the node had sent it down the host link:
 * the lbrp there translates it, and sends the answers back in through lo. */
static __always_inline int pcn_loopback_out(struct __sk_buff *skb, u32 host_port)
{
    struct pcn_flow f = {};
    struct pcn_l4info info = {};
    if (pcn_parse_flow(skb, &f, &info) < 0 || info.is_fragment)
        return TC_ACT_OK;
    if (f.proto != IPPROTO_TCP && f.proto != IPPROTO_UDP)
        return TC_ACT_OK;
    struct pcn_svc_key k = {.vip = f.daddr, .port = f.dport, .proto = f.proto,
                            .scope = PCN_SVC_INTERNAL};
    if (!lb_services.lookup(&k)) {
        struct pcn_xlate *x = lb_sessions.lookup(&f);
        if (!x || x->kind != PCN_SESS_LB)
            return TC_ACT_OK; /* the node talking to itself */
    }
    struct pcn_port *p = pcn_ports.lookup(&host_port);
    if (!p)
        return TC_ACT_OK;
    u8 mac[ETH_ALEN];
    pcn_mac_copy(mac, p->mac); /* lo's frames carry zero MACs: make it the router's */
    if (bpf_skb_store_bytes(skb, 0, mac, ETH_ALEN, 0) < 0)
        return TC_ACT_SHOT;
    return pcn_port_ingress(skb, host_port);
}

/* Attached only to netdevs whose port has an egress hook, so that copies made
 * by flooding go through the stacked cubes as well, and to the node's lo. */
int pcn_egress(struct __sk_buff *skb)
{
    u32 ifindex = skb->ifindex;
    struct pcn_iface *ifc = pcn_ifaces.lookup(&ifindex);
    if (!ifc)
        return TC_ACT_OK;
    /* a packet redirected here by an ingress walk still carries its mark */
    pcn_set_origin(skb, 0);
    if (ifc->kind == PCN_IFACE_LOOPBACK)
        return pcn_loopback_out(skb, ifc->port);
    if (ifc->kind != PCN_IFACE_PORT)
        return TC_ACT_OK;
    u32 port_id = ifc->port;
    struct pcn_port *p = pcn_ports.lookup(&port_id);
    if (!p)
        return TC_ACT_OK;
    int r = pcn_hook_run(skb, port_id, p, PCN_HOOK_EGRESS, 0, PCN_CTX_NETDEV_EGRESS);
    return r == 1 ? TC_ACT_OK : r;
}
