/* Service load balancing, shared by lbrp (ClusterIP, per pod) and the
 * k8sdispatcher (NodePort): one node-wide service table in pinned maps, so a
 * Service change is a few map updates however many pods use it.
 *
 * Each service owns a slot table in which every backend appears in
 * proportion to its weight; a flow's hash picks the slot, so the choice is
 * stable and needs no state until the session records it. */
#ifndef PCN_LB_H
#define PCN_LB_H

#include "pcn_helpers.h"
#include "pcn_parse.h"
#include "pcn_session.h"

#define PCN_LB_AFFINITY_CLIENT_IP 1
/* No backend here, but the Service has endpoints on other nodes (a traffic
 * policy of Local with none on this node): its traffic is dropped, not
 * rejected, as kube-proxy does ("drop" instead of "reject" in its
 * no-endpoint maps, pkg/proxy/nftables/proxier.go). */
#define PCN_LB_DROP_EMPTY 2

/* Which traffic a service entry serves (kube-proxy's internal and external
 * traffic policy chains). Internal: from inside the cluster, pods and the node
 * itself (ClusterIPs, and NodePorts reached through the node's address, which
 * kube-proxy short-circuits to the Cluster endpoints). External: a NodePort
 * from outside the cluster when its externalTrafficPolicy is Local (its
 * endpoints on this node only); with Cluster the internal entry serves it. */
#define PCN_SVC_INTERNAL 0
#define PCN_SVC_EXTERNAL 1

struct pcn_svc_key {
    __be32 vip;
    __be16 port;
    u8 proto;
    u8 scope;           /* PCN_SVC_INTERNAL or PCN_SVC_EXTERNAL */
};

struct pcn_svc {
    u32 id;
    u32 n_slots;        /* 0: the service has no ready backend */
    u32 flags;
    u32 affinity_timeout_s;
};

struct pcn_slot_key {
    u32 svc;
    u32 slot;
};

struct pcn_backend {
    __be32 ip;
    __be16 port;
    u16 pad;
};

struct pcn_affinity_key {
    u32 svc;
    __be32 client;
};

struct pcn_affinity {
    struct pcn_backend backend;
    u64 seen_ns;
};

/* Table sizes come from the ConfigMap (lbServiceMapMax, lbBackendMapMax in
 * pcn_agent.control.settings), passed by the agent to every compile that
 * includes this header: the maps are pinned and shared, and BCC reuses a
 * pinned map whatever size the source declares, so every module must agree
 * (the runtime checks, dataplane/programs.py stale_maps). The defaults here
 * are the settings' defaults, for builds outside the agent. */
#ifndef PCN_LB_SERVICES_MAX
#define PCN_LB_SERVICES_MAX 131072
#endif
#ifndef PCN_LB_BACKENDS_MAX
#define PCN_LB_BACKENDS_MAX 1048576
#endif

BPF_TABLE_PINNED("hash", struct pcn_svc_key, struct pcn_svc, lb_services, PCN_LB_SERVICES_MAX,
                 PCN_PIN("lb_services"));
/* Not preallocated: the kernel holds memory for the slots in use, not for
 * the million a default table may hold. */
BPF_TABLE_PINNED("hash", struct pcn_slot_key, struct pcn_backend, lb_slots, PCN_LB_BACKENDS_MAX,
                 PCN_PIN("lb_slots"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct pcn_flow, struct pcn_xlate, lb_sessions, 262144,
                 PCN_PIN("lb_sessions"));
BPF_TABLE_PINNED("lru_hash", struct pcn_affinity_key, struct pcn_affinity, lb_affinity, 65536,
                 PCN_PIN("lb_affinity"));
/* The addresses that have at least one internal service entry (the value is
 * unused): traffic to any other port of such an address is rejected, traffic
 * to an address of the Service range that is not here dropped. Not
 * preallocated: most clusters have far fewer addresses than the table is
 * sized for (preallocated, 131 072 entries held 10 MiB whatever the use). */
BPF_TABLE_PINNED("hash", __be32, u32, lb_vips, PCN_LB_SERVICES_MAX, PCN_PIN("lb_vips"),
                 BPF_F_NO_PREALLOC);

static __always_inline u32 pcn_mix32(u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

/* Stable across agents and restarts: the same flow always picks the same slot. */
static __always_inline u32 pcn_flow_hash(const struct pcn_flow *f)
{
    u32 ports = ((u32)f->sport << 16) | f->dport;
    return pcn_mix32(f->saddr ^ pcn_mix32(f->daddr ^ pcn_mix32(ports ^ f->proto)));
}

/* Pick a backend for a new flow; 0 on success, -1 when there is none. */
static __always_inline int pcn_lb_select(const struct pcn_svc *svc, const struct pcn_flow *f,
                                         u64 now, struct pcn_backend *out)
{
    if (svc->n_slots == 0)
        return -1;
    struct pcn_affinity_key ak = {.svc = svc->id, .client = f->saddr};
    if (svc->flags & PCN_LB_AFFINITY_CLIENT_IP) {
        struct pcn_affinity *a = lb_affinity.lookup(&ak);
        if (a && now - a->seen_ns < (u64)svc->affinity_timeout_s * 1000000000ULL) {
            *out = a->backend;
            a->seen_ns = now;
            return 0;
        }
    }
    struct pcn_slot_key sk = {.svc = svc->id, .slot = pcn_flow_hash(f) % svc->n_slots};
    struct pcn_backend *b = lb_slots.lookup(&sk);
    if (!b)
        return -1;
    *out = *b;
    if (svc->flags & PCN_LB_AFFINITY_CLIENT_IP) {
        struct pcn_affinity a = {.backend = *b, .seen_ns = now};
        lb_affinity.update(&ak, &a);
    }
    return 0;
}

/* The session of kind `kind` that packet `f` belongs to in lb_sessions, its
 * state advanced by the packet and its clock refreshed; NULL when there is
 * none: never recorded, past its lifetime (conntrack forgets an expired
 * connection too), or over and `f` opens a new connection on its ports (then
 * both of its entries go). k8sdispatcher.c's disp_session is the same for
 * nat_sessions (BCC cannot pass a table to a function). */
static __always_inline struct pcn_xlate *pcn_lb_session(const struct pcn_flow *f,
                                                        const struct pcn_l4info *info, u8 kind,
                                                        u8 alt_kind, u64 now)
{
    const struct pcn_session_cfg *cfg = pcn_session_cfg();
    struct pcn_xlate *x = lb_sessions.lookup(f);
    if (!x || (x->kind != kind && (!alt_kind || x->kind != alt_kind)))
        return NULL;
    kind = x->kind;
    struct pcn_flow pk = {};
    pcn_session_peer_key(f, x, &pk);
    struct pcn_xlate *peer = NULL;
    if (pcn_session_age(cfg, f->proto, x, now) != PCN_AGE_LIVE) {
        peer = lb_sessions.lookup(&pk);
        if (pcn_session_pair_age(cfg, f, x, &pk, peer, now) != PCN_AGE_LIVE)
            return NULL;
    }
    if (pcn_session_reopens(f->proto, x, info->tcp_flags)) {
        if (!peer)
            peer = lb_sessions.lookup(&pk);
        if (pcn_session_paired(f, x, &pk, peer))
            lb_sessions.delete(&pk);
        lb_sessions.delete(f);
        return NULL;
    }
    u8 next = pcn_session_next(f->proto, x->state, info->tcp_flags,
                               pcn_session_is_reply(kind), pcn_now_ms(now) - x->born_ms);
    if (next != x->state) {
        if (!peer)
            peer = lb_sessions.lookup(&pk);
        if (pcn_session_paired(f, x, &pk, peer))
            peer->state = next;
        x->state = next;
    }
    pcn_session_touch(cfg, f->proto, x, now);
    return x;
}

/* The session at `key` of kind `kind` if it is live (for ICMP errors, which
 * neither advance nor refresh it, as conntrack's RELATED packets). */
static __always_inline struct pcn_xlate *pcn_lb_session_live(const struct pcn_flow *key, u8 kind,
                                                             u8 alt_kind, u64 now)
{
    const struct pcn_session_cfg *cfg = pcn_session_cfg();
    struct pcn_xlate *x = lb_sessions.lookup(key);
    if (!x || (x->kind != kind && (!alt_kind || x->kind != alt_kind)))
        return NULL;
    if (pcn_session_age(cfg, key->proto, x, now) == PCN_AGE_LIVE)
        return x;
    struct pcn_flow pk = {};
    pcn_session_peer_key(key, x, &pk);
    struct pcn_xlate *peer = lb_sessions.lookup(&pk);
    return pcn_session_pair_age(cfg, key, x, &pk, peer, now) == PCN_AGE_LIVE ? x : NULL;
}

/* k8sdispatcher.c's disp_take_over for lb_sessions: give the reverse entry
 * `old` at `rev` to a new connection (opened by a packet with TCP `flags`)
 * when pcn_session_takeable says its own is over; the old connection's other
 * entry goes too. 1 when taken. */
static __always_inline int pcn_lb_take_over(const struct pcn_flow *rev, struct pcn_xlate *old,
                                            const struct pcn_xlate *rev_val, u64 now, u8 flags,
                                            int harder)
{
    u64 seen = old->seen_ns;
    if (!pcn_session_is_reply(old->kind))
        return 0;
    struct pcn_flow pk = {};
    pcn_session_peer_key(rev, old, &pk);
    struct pcn_xlate *peer = lb_sessions.lookup(&pk);
    int take = pcn_session_takeable(pcn_session_cfg(), rev, old, &pk, peer, now, flags, harder);
    if (take == PCN_TAKE_NO || !pcn_session_claim(old, seen, now))
        return 0;
    *old = *rev_val;
    if (take == PCN_TAKE_WITH_PEER)
        lb_sessions.delete(&pk);
    return 1;
}

/* Record both directions of a translated connection. `fwd` is the flow as the
 * client sent it; replies arrive as `rev_wire`. */
static __always_inline void pcn_lb_record(const struct pcn_flow *fwd, const struct pcn_xlate *to,
                                          const struct pcn_flow *rev_wire,
                                          const struct pcn_xlate *back)
{
    lb_sessions.update(fwd, to);
    lb_sessions.update(rev_wire, back);
}

#endif
