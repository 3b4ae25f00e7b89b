/* Chaining: how a packet moves between netdevs, cube ports and the transparent
 * cubes stacked on a port.
 *
 * All cube types loaded by one agent share the pinned maps declared here, so a
 * cube compiled once serves every instance: instance and port state are looked
 * up by id, never compiled in.
 *
 * Metadata rides in skb->cb across tail calls:
 *   cb[0] port id the packet is entering (standard cube) or stacked on
 *   cb[1] hook | position << 8 | context << 16 (transparent cubes)
 *   cb[2] instance id of the transparent cube being run
 *   cb[3] PCN_AT_TC_INGRESS when the entry program runs on a netdev's tc
 *         ingress hook (pcn_at_tc_ingress), anything else elsewhere
 * A port's whole configuration, its hooks included, is one hash value: the agent
 * replaces it with a single update, so a packet sees either the old chain or
 * the new one and is never lost in between.
 */
#ifndef PCN_CHAIN_H
#define PCN_CHAIN_H

#include "pcn_helpers.h"
#include "pcn_counters.h"

#define PCN_PEER_NONE 0
#define PCN_PEER_NETDEV 1
#define PCN_PEER_PORT 2

#define PCN_HOOK_INGRESS 0 /* into the cube through this port */
#define PCN_HOOK_EGRESS 1  /* out of the cube through this port */

#define PCN_CTX_CUBE 0        /* tail-called from a cube or the entry program */
#define PCN_CTX_NETDEV_EGRESS 1 /* running on a netdev's tc egress hook */

/* pcn_port.flags */
#define PCN_PORT_HOST_SHARED 1 /* the netdev's addresses belong to the host stack too */
#define PCN_PORT_PEER_NS 2     /* the netdev is a veth whose other end lives in another
                                  network namespace (a pod's eth0): pcn_port_deliver */

/* skb->cb[3] of a packet whose entry program runs on tc ingress. A magic
 * value rather than a bit: tc hands the programs whatever the qdisc layer
 * left in cb, so only an exact match written by our own entry program counts. */
#define PCN_AT_TC_INGRESS 0x7063696eU /* "pcin" */

#define PCN_IFACE_PORT 0   /* netdev peered with a port */
#define PCN_IFACE_INJECT 1 /* the agent's slow-path injection device */
#define PCN_IFACE_LOOPBACK 2 /* the node's lo: its connections to its own NodePorts enter
                                the router's host port (entry.c, pcn_loopback_out) */

struct pcn_hook {
    u32 n;
    u32 slot[PCN_CHAIN_MAX]; /* program array slot of each stacked cube */
    u32 inst[PCN_CHAIN_MAX]; /* its instance id */
};

struct pcn_port {
    u32 cube_id;   /* instance owning the port */
    u32 cube_slot; /* program array slot of the owner's program */
    u32 peer_kind;
    u32 peer;      /* ifindex or port id */
    __be32 ip;     /* address of the port (routers), 0 if none */
    u32 prefixlen;
    u8 mac[ETH_ALEN];
    u16 flags;
    struct pcn_hook hooks[2];
};

struct pcn_iface {
    u32 port;
    u32 kind;
};

BPF_TABLE_PINNED("prog", u32, u32, pcn_progs, PCN_MAX_SLOTS, PCN_PIN("progs"));
BPF_TABLE_PINNED("hash", u32, struct pcn_port, pcn_ports, PCN_MAX_PORTS, PCN_PIN("ports"));
BPF_TABLE_PINNED("hash", u32, struct pcn_iface, pcn_ifaces, PCN_MAX_PORTS, PCN_PIN("ifaces"));

static __always_inline int pcn_drop(struct __sk_buff *skb, u32 port, u32 cube, u32 reason)
{
    pcn_count_drop(port, cube, reason);
    return TC_ACT_SHOT;
}

static __always_inline void pcn_set_meta(struct __sk_buff *skb, u32 port, u32 hook,
                                         u32 pos, u32 ctx, u32 inst)
{
    skb->cb[0] = port;
    skb->cb[1] = hook | (pos << 8) | (ctx << 16);
    skb->cb[2] = inst;
}

/* Each read is one load from the context at a constant offset, written in
 * assembly: left to itself, clang may keep &skb->cb[i] in a register when a
 * cube reads the same word on several paths, and the verifier refuses any
 * dereference of a modified context pointer ("dereference of modified ctx
 * ptr"). */
#define PCN_META_LOAD(i)                                                                  \
    ({                                                                                    \
        u32 v_;                                                                           \
        asm volatile("%0 = *(u32 *)(%1 + %2)"                                           \
                     : "=r"(v_)                                                           \
                     : "r"(skb), "i"(offsetof(struct __sk_buff, cb) + 4 * (i)));          \
        v_;                                                                               \
    })

static __always_inline u32 pcn_meta_port(struct __sk_buff *skb) { return PCN_META_LOAD(0); }
static __always_inline u32 pcn_meta_hook(struct __sk_buff *skb) { return PCN_META_LOAD(1) & 0xff; }
static __always_inline u32 pcn_meta_pos(struct __sk_buff *skb)
{
    return (PCN_META_LOAD(1) >> 8) & 0xff;
}
static __always_inline u32 pcn_meta_ctx(struct __sk_buff *skb) { return PCN_META_LOAD(1) >> 16; }
static __always_inline u32 pcn_meta_instance(struct __sk_buff *skb) { return PCN_META_LOAD(2); }

/* Written once by the entry program (never by pcn_set_meta, so it survives
 * every tail call of the packet's walk). */
static __always_inline void pcn_set_origin(struct __sk_buff *skb, int at_ingress)
{
    skb->cb[3] = at_ingress ? PCN_AT_TC_INGRESS : 0;
}

/* bpf_redirect_peer only works from a tc ingress hook: the kernel drops what
 * it is asked to redirect that way from egress (skb_do_redirect checks
 * skb_at_tc_ingress), so the walk has to know where it started. */
static __always_inline int pcn_at_tc_ingress(struct __sk_buff *skb)
{
    return PCN_META_LOAD(3) == PCN_AT_TC_INGRESS;
}

/* Whether a port peered with a netdev hands packets straight to the other
 * end of its veth (see pcn_port_deliver). */
static __always_inline int pcn_into_peer(struct __sk_buff *skb, const struct pcn_port *p)
{
    return p->peer_kind == PCN_PEER_NETDEV && (p->flags & PCN_PORT_PEER_NS) &&
           pcn_at_tc_ingress(skb);
}

/* Run stacked cube `pos` of a hook, or report that the hook is exhausted (1). */
static __always_inline int pcn_hook_run(struct __sk_buff *skb, u32 port_id, struct pcn_port *p,
                                        u32 hook, u32 pos, u32 ctx)
{
    struct pcn_hook *h = &p->hooks[hook & 1];
    if (pos >= h->n || pos >= PCN_CHAIN_MAX)
        return 1;
    pcn_set_meta(skb, port_id, hook, pos, ctx, h->inst[pos & (PCN_CHAIN_MAX - 1)]);
    pcn_progs.call(skb, h->slot[pos & (PCN_CHAIN_MAX - 1)]);
    return pcn_drop(skb, port_id, p->cube_id, PCN_DROP_TAIL_CALL);
}

/* Hand the packet to the cube owning `port_id`, skipping the ingress hook. */
static __always_inline int pcn_to_cube(struct __sk_buff *skb, u32 port_id, struct pcn_port *p)
{
    pcn_set_meta(skb, port_id, PCN_HOOK_INGRESS, 0, PCN_CTX_CUBE, 0);
    pcn_progs.call(skb, p->cube_slot);
    return pcn_drop(skb, port_id, p->cube_id, PCN_DROP_TAIL_CALL);
}

/* A packet enters a port from its peer: ingress hook first, then the cube. */
static __always_inline int pcn_port_ingress(struct __sk_buff *skb, u32 port_id)
{
    struct pcn_port *p = pcn_ports.lookup(&port_id);
    if (!p)
        return pcn_drop(skb, port_id, 0, PCN_DROP_NO_PORT);
    pcn_count_rx(port_id, skb->len);
    if (p->hooks[PCN_HOOK_INGRESS].n) {
        int r = pcn_hook_run(skb, port_id, p, PCN_HOOK_INGRESS, 0, PCN_CTX_CUBE);
        if (r != 1)
            return r;
    }
    return pcn_to_cube(skb, port_id, p);
}

/* Past the egress hook: deliver to whatever the port is peered with.
 *
 * A pod's veth (PCN_PORT_PEER_NS) reached from a tc ingress hook gets the
 * packet with bpf_redirect_peer (Linux >= 5.10): it enters the pod's eth0
 * receive path at once, in this softirq, instead of being transmitted on the
 * host end, queued on this CPU's backlog by veth_xmit and received in a later
 * pass of net_rx_action. That skips the host end's qdisc and tc egress hook,
 * which is why pcn_send runs the port's egress cubes before coming here (the
 * kernel also scrubs the packet, as a crossing of network namespaces does).
 * Anywhere else (lo's egress hook, a veth in the same namespace) the plain
 * redirect to the netdev's egress stays. */
static __always_inline int pcn_port_deliver(struct __sk_buff *skb, u32 port_id, struct pcn_port *p)
{
    if (p->peer_kind == PCN_PEER_NETDEV) {
        if (pcn_into_peer(skb, p))
            return bpf_redirect_peer(p->peer, 0);
        return bpf_redirect(p->peer, 0);
    }
    if (p->peer_kind == PCN_PEER_PORT)
        return pcn_port_ingress(skb, p->peer);
    return pcn_drop(skb, port_id, p->cube_id, PCN_DROP_NO_PEER);
}

/* A standard cube sends the packet out of one of its ports. A netdev peer runs
 * the egress hook on its own tc egress program (so clones from flooding pass
 * through it too); a port peer runs it here by tail calls, and so does a
 * pod's veth the packet will skip the host end of (pcn_port_deliver): every
 * packet meets the port's egress cubes exactly once either way. */
static __always_inline int pcn_send_port(struct __sk_buff *skb, u32 port_id, struct pcn_port *p)
{
    pcn_count_tx(port_id, skb->len);
    if ((p->peer_kind == PCN_PEER_PORT || pcn_into_peer(skb, p)) &&
        p->hooks[PCN_HOOK_EGRESS].n) {
        int r = pcn_hook_run(skb, port_id, p, PCN_HOOK_EGRESS, 0, PCN_CTX_CUBE);
        if (r != 1)
            return r;
    }
    return pcn_port_deliver(skb, port_id, p);
}

/* pcn_send_port for a cube that holds only the port's id (the router, which
 * looked the port up for its MTU, passes it: one hash lookup less a packet). */
static __always_inline int pcn_send(struct __sk_buff *skb, u32 port_id)
{
    struct pcn_port *p = pcn_ports.lookup(&port_id);
    if (!p)
        return pcn_drop(skb, port_id, 0, PCN_DROP_NO_PORT);
    return pcn_send_port(skb, port_id, p);
}

/* A copy of the packet out of a netdev-peered port; the original stays with the
 * caller. Used for flooding. Returns 0 when a copy was sent. */
static __always_inline int pcn_send_copy(struct __sk_buff *skb, u32 port_id, struct pcn_port *p)
{
    if (p->peer_kind != PCN_PEER_NETDEV)
        return -1;
    if (bpf_clone_redirect(skb, p->peer, 0) < 0)
        return -1;
    pcn_count_tx(port_id, skb->len);
    return 0;
}

/* A transparent cube lets the packet go on: the next stacked cube, or where the
 * hook leads once it is exhausted. */
static __always_inline int pcn_pass(struct __sk_buff *skb)
{
    u32 port_id = pcn_meta_port(skb);
    u32 hook = pcn_meta_hook(skb);
    u32 pos = pcn_meta_pos(skb) + 1;
    u32 ctx = pcn_meta_ctx(skb);
    struct pcn_port *p = pcn_ports.lookup(&port_id);
    if (!p)
        return pcn_drop(skb, port_id, 0, PCN_DROP_NO_PORT);
    int r = pcn_hook_run(skb, port_id, p, hook, pos, ctx);
    if (r != 1)
        return r;
    if (hook == PCN_HOOK_INGRESS)
        return pcn_to_cube(skb, port_id, p);
    if (ctx == PCN_CTX_NETDEV_EGRESS)
        return TC_ACT_OK;
    return pcn_port_deliver(skb, port_id, p);
}

/* A transparent cube drops the packet; counted on the port it is stacked on
 * and on the transparent cube's own instance. */
static __always_inline int pcn_filter_drop(struct __sk_buff *skb, u32 reason)
{
    return pcn_drop(skb, pcn_meta_port(skb), pcn_meta_instance(skb), reason);
}

#endif
