/* Slow path: hand a packet (or just an event) to the agent in user space, for
 * work that does not belong in the fast path, such as resolving a next hop.
 * The agent may later re-inject the packet through its injection device. */
#ifndef PCN_SLOWPATH_H
#define PCN_SLOWPATH_H

#include "pcn_helpers.h"

/* Mirrored by pcn_agent.dataplane.maps.SlowMsg and SlowReason. */
enum pcn_slow_reason {
    PCN_SLOW_ARP_MISS = 1,      /* packet waits for next hop `arg` on out_port */
    PCN_SLOW_NEIGH_LEARNED = 2, /* next hop `arg` was just resolved */
};

struct pcn_slow_msg {
    u32 reason;
    u32 cube_id;
    u32 in_port;
    u32 out_port;
    __be32 arg;
    u32 pkt_len; /* bytes of packet that follow the message */
};

/* BPF_PERF_OUTPUT, but pinned: a restarted agent takes over the programs the
 * previous one loaded (pcn_agent.dataplane.programs), and those programs
 * submit to the map they were loaded with. Pinned, it is the same map the new
 * agent reads; unpinned, slow-path messages would go to the dead agent's map
 * until the programs were reloaded. max_entries 0: BCC sizes it to the CPUs. */
struct pcn_slowpath_table_t {
    int key;
    u32 leaf;
    int (*perf_submit)(void *, void *, u32);
    int (*perf_submit_skb)(void *, u32, void *, u32);
    u32 max_entries;
};
__attribute__((section("maps/perf_output:" PCN_PIN("slowpath"))))
struct pcn_slowpath_table_t pcn_slowpath = {.max_entries = 0};

static __always_inline int pcn_slowpath_send(struct __sk_buff *skb, u32 reason, u32 cube,
                                             u32 in_port, u32 out_port, __be32 arg,
                                             int with_packet)
{
    struct pcn_slow_msg msg = {};
    msg.reason = reason;
    msg.cube_id = cube;
    msg.in_port = in_port;
    msg.out_port = out_port;
    msg.arg = arg;
    msg.pkt_len = with_packet ? skb->len : 0;
    return pcn_slowpath.perf_submit_skb(skb, msg.pkt_len, &msg, sizeof(msg));
}

#endif
