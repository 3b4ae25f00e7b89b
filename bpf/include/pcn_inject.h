/* Injection: the agent writes a frame on its injection device with a trailer
 * naming where the frame goes. A trailer (not a header) keeps the original
 * frame, ethertype included, untouched in front, so no header needs moving. */
#ifndef PCN_INJECT_H
#define PCN_INJECT_H

#include "pcn_chain.h"

#define PCN_INJECT_MAGIC 0x70636e21 /* "pcn!" */
#define PCN_INJECT_TO_CUBE 1        /* into the cube owning `port`, as received there */
#define PCN_INJECT_OUT_PORT 2       /* out of `port`, as if the cube sent it */

struct pcn_inject_trailer {
    u32 port;
    u32 action;
    u32 magic;
};

static __always_inline int pcn_inject(struct __sk_buff *skb)
{
    struct pcn_inject_trailer t;
    u32 len = skb->len;
    if (len < sizeof(struct ethhdr) + sizeof(t))
        return TC_ACT_SHOT;
    if (bpf_skb_load_bytes(skb, len - sizeof(t), &t, sizeof(t)) < 0)
        return TC_ACT_SHOT;
    if (t.magic != PCN_INJECT_MAGIC)
        return TC_ACT_SHOT;
    if (bpf_skb_change_tail(skb, len - sizeof(t), 0) < 0)
        return TC_ACT_SHOT;
    u32 port_id = t.port;
    struct pcn_port *p = pcn_ports.lookup(&port_id);
    if (!p)
        return pcn_drop(skb, port_id, 0, PCN_DROP_NO_PORT);
    if (t.action == PCN_INJECT_TO_CUBE)
        return pcn_to_cube(skb, port_id, p);
    if (t.action == PCN_INJECT_OUT_PORT)
        return pcn_send(skb, port_id);
    return TC_ACT_SHOT;
}

#endif
