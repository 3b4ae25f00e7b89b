/* Entry programs: the only programs attached to netdevs. One copy serves every
 * netdev of the agent: the ifindex finds the port, so attaching a pod compiles
 * nothing and adds one map entry. */
#include "pcn_chain.h"
#include "pcn_inject.h"

int pcn_ingress(struct __sk_buff *skb)
{
    u32 ifindex = skb->ifindex;
    struct pcn_iface *ifc = pcn_ifaces.lookup(&ifindex);
    if (!ifc)
        return TC_ACT_OK; /* not a pcn netdev: the kernel stack keeps it */
    if (ifc->kind == PCN_IFACE_INJECT)
        return pcn_inject(skb);
    return pcn_port_ingress(skb, ifc->port);
}

/* Attached only to netdevs whose port has an egress hook, so that copies made
 * by flooding go through the stacked cubes as well. */
int pcn_egress(struct __sk_buff *skb)
{
    u32 ifindex = skb->ifindex;
    struct pcn_iface *ifc = pcn_ifaces.lookup(&ifindex);
    if (!ifc || ifc->kind != PCN_IFACE_PORT)
        return TC_ACT_OK;
    u32 port_id = ifc->port;
    struct pcn_port *p = pcn_ports.lookup(&port_id);
    if (!p)
        return TC_ACT_OK;
    int r = pcn_hook_run(skb, port_id, p, PCN_HOOK_EGRESS, 0, PCN_CTX_NETDEV_EGRESS);
    return r == 1 ? TC_ACT_OK : r;
}
