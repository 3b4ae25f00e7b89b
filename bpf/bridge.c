/* bridge: a learning Ethernet switch between its ports. */
#include "pcn_chain.h"
#include "pcn_parse.h"

#define BRIDGE_MAX_PORTS 128
#define BRIDGE_REFRESH_NS 1000000000ULL /* re-stamp a learned MAC at most once a second */

struct bridge_fdb_key {
    u32 cube;
    u8 mac[ETH_ALEN];
    u16 pad;
};

struct bridge_fdb_val {
    u32 port;
    u32 pad;
    u64 seen_ns;
};

/* Flooding plan, replaced whole by the agent when ports change: netdev-peered
 * ports with their ifindex (copies are cloned to them) and at most one
 * cube-peered port, which gets the original packet by tail call. */
struct bridge_cfg {
    u64 aging_ns;
    u32 n_ports;
    u32 cube_port; /* 0: none */
    u32 ports[BRIDGE_MAX_PORTS];
    u32 ifindex[BRIDGE_MAX_PORTS];
};

BPF_TABLE_PINNED("hash", struct bridge_fdb_key, struct bridge_fdb_val, bridge_fdb, 65536,
                 PCN_PIN("bridge_fdb"));
BPF_TABLE_PINNED("hash", u32, struct bridge_cfg, bridge_cfgs, PCN_MAX_CUBES, PCN_PIN("bridge_cfg"));

/* Branches in this loop are kept to a minimum: the verifier walks all of its
 * iterations. */
static __always_inline int bridge_flood(struct __sk_buff *skb, u32 cube, u32 in_port)
{
    struct bridge_cfg *cfg = bridge_cfgs.lookup(&cube);
    if (!cfg)
        return pcn_drop(skb, in_port, cube, PCN_DROP_NO_PORT);
    u32 n = cfg->n_ports;
    u32 len = skb->len;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < BRIDGE_MAX_PORTS; i++) {
        if (i >= n)
            break;
        u32 out = cfg->ports[i];
        if (out == in_port)
            continue;
        if (bpf_clone_redirect(skb, cfg->ifindex[i], 0) == 0)
            pcn_count_tx(out, len);
    }
    u32 up = cfg->cube_port;
    if (up && up != in_port)
        return pcn_send(skb, up);
    return TC_ACT_SHOT;
}

int bridge_rx(struct __sk_buff *skb)
{
    u32 in_port = pcn_meta_port(skb);
    struct pcn_port *ip = pcn_ports.lookup(&in_port);
    if (!ip)
        return pcn_drop(skb, in_port, 0, PCN_DROP_NO_PORT);
    u32 cube = ip->cube_id;
    struct ethhdr *eth = pcn_eth(skb);
    if (!eth)
        return pcn_drop(skb, in_port, cube, PCN_DROP_PARSE);

    u64 now = bpf_ktime_get_ns();
    struct bridge_fdb_key key = {.cube = cube};
    if (!pcn_mac_is_multicast(eth->h_source)) {
        pcn_mac_copy(key.mac, eth->h_source);
        struct bridge_fdb_val *seen = bridge_fdb.lookup(&key);
        if (!seen || seen->port != in_port || now - seen->seen_ns > BRIDGE_REFRESH_NS) {
            struct bridge_fdb_val v = {.port = in_port, .seen_ns = now};
            bridge_fdb.update(&key, &v);
        }
    }

    if (pcn_mac_is_multicast(eth->h_dest))
        return bridge_flood(skb, cube, in_port);

    pcn_mac_copy(key.mac, eth->h_dest);
    struct bridge_fdb_val *dst = bridge_fdb.lookup(&key);
    if (dst) {
        struct bridge_cfg *cfg = bridge_cfgs.lookup(&cube);
        u64 aging = cfg ? cfg->aging_ns : 300000000000ULL;
        if (now - dst->seen_ns <= aging) {
            if (dst->port == in_port)
                return pcn_drop(skb, in_port, cube, PCN_DROP_HAIRPIN);
            return pcn_send(skb, dst->port);
        }
    }
    return bridge_flood(skb, cube, in_port);
}
