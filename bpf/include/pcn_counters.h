/* Counters: per-CPU so the fast path never contends on a cache line. The agent
 * sums the CPUs when it reads them. */
#ifndef PCN_COUNTERS_H
#define PCN_COUNTERS_H

#include "pcn_helpers.h"

struct pcn_port_stats {
    u64 rx_packets;
    u64 rx_bytes;
    u64 tx_packets;
    u64 tx_bytes;
    u64 drops;
};

/* Why a cube dropped a packet; mirrored by pcn_agent.dataplane.maps.DropReason. */
enum pcn_drop_reason {
    PCN_DROP_NONE = 0,
    PCN_DROP_NO_PORT = 1,      /* metadata names a port that does not exist */
    PCN_DROP_NO_PEER = 2,      /* leaving through an unconnected port */
    PCN_DROP_TAIL_CALL = 3,    /* next program missing from the program array */
    PCN_DROP_PARSE = 4,        /* malformed or truncated header */
    PCN_DROP_NO_ROUTE = 5,
    PCN_DROP_TTL = 6,
    PCN_DROP_NOT_FOR_US = 7,   /* unicast frame for another MAC reached a router */
    PCN_DROP_HAIRPIN = 8,      /* destination learned on the input port */
    PCN_DROP_FILTERED = 9,     /* a transparent cube decided to drop */
    PCN_DROP_UNSUPPORTED = 10, /* protocol the cube does not handle */
    PCN_DROP_SLOWPATH = 11,    /* could not hand the packet to user space */
    PCN_DROP_REJECTED = 12,    /* service without backends: answered with RST/ICMP */
    PCN_DROP_NO_BACKEND = 13,  /* no backend to choose (a Local policy with none here), or an
                                  unallocated address of the Service range */
    PCN_DROP_NAT_EXHAUSTED = 14, /* no free port to masquerade a new connection */
    PCN_DROP_REWRITE = 15,     /* a header rewrite failed */
    PCN_DROP_FRAGMENT = 16,    /* a fragment that cannot be judged or translated (pcn_frag.h) */
    PCN_DROP_NO_MASQUERADE = 17, /* a pod's packet that must leave masqueraded but cannot be */
    PCN_DROP_TOO_BIG = 18,     /* larger than the MTU of the port a router would send it out
                                  of: answered with ICMP fragmentation needed when DF is set */
    PCN_DROP_POLICY = 19,      /* denied by a network policy (policy.c) */
    PCN_DROP_RATE = 20,        /* over a policer's rate: its token bucket was short (policer.c) */
};

BPF_TABLE_PINNED("percpu_array", u32, struct pcn_port_stats, pcn_port_stats,
                 PCN_MAX_PORTS, PCN_PIN("port_stats"));
BPF_TABLE_PINNED("percpu_array", u32, u64, pcn_cube_stats,
                 PCN_MAX_CUBES * PCN_DROP_REASONS, PCN_PIN("cube_stats"));

static __always_inline void pcn_count_rx(u32 port, u32 bytes)
{
    struct pcn_port_stats *s = pcn_port_stats.lookup(&port);
    if (s) {
        s->rx_packets++;
        s->rx_bytes += bytes;
    }
}

static __always_inline void pcn_count_tx(u32 port, u32 bytes)
{
    struct pcn_port_stats *s = pcn_port_stats.lookup(&port);
    if (s) {
        s->tx_packets++;
        s->tx_bytes += bytes;
    }
}

static __always_inline void pcn_count_drop(u32 port, u32 cube, u32 reason)
{
    struct pcn_port_stats *s = pcn_port_stats.lookup(&port);
    if (s)
        s->drops++;
    u32 idx = cube * PCN_DROP_REASONS + reason;
    u64 *c = pcn_cube_stats.lookup(&idx);
    if (c)
        (*c)++;
}

#endif
