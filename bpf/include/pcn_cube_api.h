/* The cube API: what the C source of a CubeType (a custom cube a cluster admin
 * registers) is written against. docs/writing-a-cube.md is its guide.
 *
 * The source defines one function,
 *
 *     static int pcn_cube_handle(struct __sk_buff *skb, struct pcn_cube_ctx *ctx)
 *
 * returning pcn_cube_pass(ctx) or pcn_cube_drop(ctx). The agent compiles it
 * inside a transparent cube (pcn_agent.dataplane.cubes.custom wraps it): the
 * wrapper finds the instance's parameters, calls the function, and moves the
 * packet on along the pod's chain or drops it, counted like a firewall's drop.
 * A redirect is not offered: a transparent cube sits on one hook of one port,
 * and a packet that left the chain from the middle would skip the cubes after
 * it (the policy cube among them).
 *
 * Parameters are values, never code: each instance's are one map value of
 * PCN_CUBE_MAX_PARAMS words, read by the index the agent generates from the
 * schema (#define PCN_PARAM_<NAME> <index>), so one compiled program serves
 * every instance and a NetworkFunction's edit is one map update.
 */
#ifndef PCN_CUBE_API_H
#define PCN_CUBE_API_H

#include "pcn_helpers.h"
#include "pcn_chain.h"
#include "pcn_parse.h"

/* Kept in sync with pcn_crds.cubetype (MAX_PARAMS, MAX_COUNTERS); powers of
 * two, so that an index masked with (N - 1) is one the verifier can bound. */
#define PCN_CUBE_MAX_PARAMS 16
#define PCN_CUBE_MAX_COUNTERS 16

#define PCN_CUBE_PASS 0
#define PCN_CUBE_DROP 1

#define PCN_CUBE_TO_POD 1   /* ctx->direction: the packet is on its way to the pod */
#define PCN_CUBE_FROM_POD 0 /* the pod sent it */

/* The packet headers a cube may look into: beyond this offset a packet is
 * read with pcn_cube_load, which copies. */
#define PCN_CUBE_MAX_OFFSET 1500

struct pcn_cube_params {
    u64 v[PCN_CUBE_MAX_PARAMS];
};

/* One value per instance: the agent replaces it whole, so a packet sees all of
 * an edit's parameters or none. Shared by every CubeType (instance ids are the
 * node's), pinned so that an agent restart keeps them. */
BPF_TABLE_PINNED("hash", u32, struct pcn_cube_params, pcn_cube_params, PCN_MAX_CUBES,
                 PCN_PIN("cube_params"));
/* Per-CPU so that counting never contends; the agent sums the CPUs. */
BPF_TABLE_PINNED("percpu_array", u32, u64, pcn_cube_ctrs,
                 PCN_MAX_CUBES * PCN_CUBE_MAX_COUNTERS, PCN_PIN("cube_ctrs"));

struct pcn_cube_ctx {
    u32 instance;  /* the NetworkFunction's cube on this node */
    u32 port;      /* the pod's port the cube is stacked on */
    u32 direction; /* PCN_CUBE_TO_POD or PCN_CUBE_FROM_POD */
    u32 pad;
    struct pcn_cube_params *params;
};

/* ---------------------------------------------------------------- verdicts */
static __always_inline int pcn_cube_pass(struct pcn_cube_ctx *ctx)
{
    return PCN_CUBE_PASS;
}

static __always_inline int pcn_cube_drop(struct pcn_cube_ctx *ctx)
{
    return PCN_CUBE_DROP;
}

/* ---------------------------------------------------------------- parameters */
/* The word of parameter `idx` (PCN_PARAM_<NAME>): an integer (two's
 * complement), a boolean (0/1), an enum value's index (PCN_PARAM_<NAME>_<VALUE>)
 * or an IPv4 address as the packet holds it (network byte order). */
static __always_inline u64 pcn_cube_param(struct pcn_cube_ctx *ctx, u32 idx)
{
    return ctx->params->v[idx & (PCN_CUBE_MAX_PARAMS - 1)];
}

/* ---------------------------------------------------------------- counters */
static __always_inline void pcn_cube_count_add(struct pcn_cube_ctx *ctx, u32 idx, u64 n)
{
    u32 k = ctx->instance * PCN_CUBE_MAX_COUNTERS + (idx & (PCN_CUBE_MAX_COUNTERS - 1));
    u64 *c = pcn_cube_ctrs.lookup(&k);
    if (c)
        *c += n;
}

/* Counter `idx` (PCN_COUNTER_<NAME>) of this instance, plus one. */
static __always_inline void pcn_cube_count(struct pcn_cube_ctx *ctx, u32 idx)
{
    pcn_cube_count_add(ctx, idx, 1);
}

/* ---------------------------------------------------------------- parsing */
static __always_inline struct ethhdr *pcn_cube_eth(struct __sk_buff *skb)
{
    return pcn_eth(skb);
}

/* The IPv4 header, or NULL for anything else (ARP, IPv6, a runt). Like every
 * pointer into the packet, it is stale after a helper that may move packet
 * data (bpf_skb_store_bytes, pcn_cube_ipv4_store16): parse again. */
static __always_inline struct iphdr *pcn_cube_ipv4(struct __sk_buff *skb)
{
    struct ethhdr *eth = pcn_eth(skb);
    if (!eth || eth->h_proto != bpf_htons(ETH_P_IP))
        return NULL;
    return pcn_ipv4(skb);
}

/* The 5-tuple and L4 facts of an IPv4 packet (pcn_parse.h's pcn_parse_flow:
 * PCN_PARSE_OK, PCN_PARSE_NOT_IPV4 or PCN_PARSE_SHORT). */
static __always_inline int pcn_cube_flow(struct __sk_buff *skb, struct pcn_flow *f,
                                         struct pcn_l4info *info)
{
    return pcn_parse_flow(skb, f, info);
}

/* `len` bytes at `off` from the frame's start, in place, or NULL when the
 * packet is shorter. `len` must be a constant for the verifier to check the
 * reads through the pointer. */
static __always_inline void *pcn_cube_bytes(struct __sk_buff *skb, u32 off, u32 len)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    if (off > PCN_CUBE_MAX_OFFSET)
        return NULL;
    void *p = data + off;
    if (p + len > data_end)
        return NULL;
    return p;
}

/* Copy `len` bytes at `off` into `to` (0, or a negative error when the packet
 * is shorter): reads what is beyond the linear part, e.g. a DNS question. */
static __always_inline int pcn_cube_load(struct __sk_buff *skb, u32 off, void *to, u32 len)
{
    return bpf_skb_load_bytes(skb, off, to, len);
}

/* ---------------------------------------------------------------- rewriting */
/* Replace the 16-bit word at `off` of the IPv4 header (offset from the IP
 * header's start, even) by `new`, whose current value is `old`, and fix the
 * header checksum incrementally (RFC 1624), as pcn_csum.h does for the TTL.
 * 0, or a negative error: the header may then be half rewritten, so drop the
 * packet. */
static __always_inline int pcn_cube_ipv4_store16(struct __sk_buff *skb, u32 off, u16 old,
                                                 u16 new_word)
{
    u32 at = sizeof(struct ethhdr) + (off & 0x3e);
    if (bpf_skb_store_bytes(skb, at, &new_word, 2, 0) < 0)
        return -1;
    return bpf_l3_csum_replace(skb, sizeof(struct ethhdr) + offsetof(struct iphdr, check),
                               old, new_word, 2);
}

#endif
