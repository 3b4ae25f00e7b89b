/* Socket-level service load balancing (sock_lb.c): the state a pod's socket
 * keeps once its ClusterIP was translated at connect()/sendmsg() time.
 *
 * The backend is chosen from the same node-wide service table as the lbrp's
 * (pcn_lb.h: lb_services, lb_slots), so a Service change reaches both paths
 * with the same map updates. What the socket path adds is a reverse record
 * per socket, as Cilium's socket LB keeps one (its "rev NAT" map keyed by
 * socket cookie): the kernel shows the application the backend's address
 * wherever it reports a peer (recvfrom(), getpeername()), and the
 * application must see the address it asked for. */
#ifndef PCN_SOCK_H
#define PCN_SOCK_H

#include "pcn_helpers.h"
#include "pcn_lb.h"

/* Per socket and backend: the service address the socket asked for. A UDP
 * socket may talk to several Services, so the backend is part of the key. */
struct pcn_sock_rev_key {
    u64 cookie;         /* bpf_get_socket_cookie(): unique for the socket's life */
    __be32 ip;          /* the backend, as the kernel reports the peer */
    __be16 port;
    u16 pad;
};

struct pcn_sock_rev {
    __be32 vip;
    __be16 port;
    u16 pad;
};

/* Session affinity by client. At connect() time a pod's socket has no source
 * address yet (it is chosen by the route afterwards), so the client is the
 * socket's network namespace: one per pod, the same identity as the pod IP
 * the lbrp keys lb_affinity by. */
struct pcn_sock_affinity_key {
    u32 svc;
    u32 pad;
    u64 netns;          /* bpf_get_netns_cookie() */
};

/* LRU: a closed socket's record (there is no close hook we rely on) ages
 * out instead of filling the table. An LRU map is preallocated: 65536
 * records cost about 5 MiB; a record lost to eviction only shows the
 * backend's address to a socket that asks for its peer. */
BPF_TABLE_PINNED("lru_hash", struct pcn_sock_rev_key, struct pcn_sock_rev, sock_rev, 65536,
                 PCN_PIN("sock_rev"));
BPF_TABLE_PINNED("lru_hash", struct pcn_sock_affinity_key, struct pcn_affinity, sock_affinity,
                 65536, PCN_PIN("sock_affinity"));

/* How a translation attempt ended. */
#define PCN_SOCK_PASS 0     /* not a service (or left to the lbrp): untouched */
#define PCN_SOCK_XLATED 1   /* the address now names a backend */
#define PCN_SOCK_REFUSE 2   /* a service without endpoints: refuse, as kube-proxy's REJECT */

/* Pick a backend of `svc` for a socket. The slot comes from the socket
 * cookie: every socket is a new draw (the lbrp hashes the 5-tuple, which does
 * not exist yet), and a UDP socket keeps its backend for all its datagrams
 * while the slot table is unchanged. Returns 0, or -1 with no backend. */
static __always_inline int pcn_sock_select(const struct pcn_svc *svc, u64 cookie, u64 netns,
                                           u64 now, struct pcn_backend *out)
{
    if (svc->n_slots == 0)
        return -1;
    struct pcn_sock_affinity_key ak = {.svc = svc->id, .netns = netns};
    if (svc->flags & PCN_LB_AFFINITY_CLIENT_IP) {
        struct pcn_affinity *a = sock_affinity.lookup(&ak);
        if (a && now - a->seen_ns < (u64)svc->affinity_timeout_s * 1000000000ULL) {
            *out = a->backend;
            a->seen_ns = now;
            return 0;
        }
    }
    u32 h = pcn_mix32((u32)cookie ^ pcn_mix32((u32)(cookie >> 32)));
    struct pcn_slot_key sk = {.svc = svc->id, .slot = h % svc->n_slots};
    struct pcn_backend *b = lb_slots.lookup(&sk);
    if (!b)
        return -1;
    *out = *b;
    if (svc->flags & PCN_LB_AFFINITY_CLIENT_IP) {
        struct pcn_affinity a = {.backend = *b, .seen_ns = now};
        sock_affinity.update(&ak, &a);
    }
    return 0;
}

/* Translate the destination `*ip`:`*port` (network order) of a socket of
 * protocol `proto` in place when it is a ClusterIP service. A service whose
 * empty backend set must drop (PCN_LB_DROP_EMPTY) is passed untouched: the
 * lbrp drops its packets as kube-proxy does, the socket cannot say "drop". */
static __always_inline int pcn_sock_xlate(u64 cookie, u64 netns, u8 proto, __be32 *ip,
                                          __be16 *port)
{
    struct pcn_svc_key k = {.vip = *ip, .port = *port, .proto = proto,
                            .scope = PCN_SVC_INTERNAL};
    struct pcn_svc *svc = lb_services.lookup(&k);
    if (!svc)
        return PCN_SOCK_PASS;
    struct pcn_backend b = {};
    if (pcn_sock_select(svc, cookie, netns, bpf_ktime_get_ns(), &b) < 0)
        return (svc->flags & PCN_LB_DROP_EMPTY) ? PCN_SOCK_PASS : PCN_SOCK_REFUSE;
    struct pcn_sock_rev_key rk = {.cookie = cookie, .ip = b.ip, .port = b.port};
    struct pcn_sock_rev rv = {.vip = *ip, .port = *port};
    sock_rev.update(&rk, &rv);
    *ip = b.ip;
    *port = b.port;
    return PCN_SOCK_XLATED;
}

/* The service address a socket asked for when the kernel reports backend
 * `ip`:`port` as its peer; 0 when it is no translated peer of this socket. */
static __always_inline int pcn_sock_rev_lookup(u64 cookie, __be32 *ip, __be16 *port)
{
    struct pcn_sock_rev_key rk = {.cookie = cookie, .ip = *ip, .port = *port};
    struct pcn_sock_rev *rv = sock_rev.lookup(&rk);
    if (!rv)
        return 0;
    *ip = rv->vip;
    *port = rv->port;
    return 1;
}

#endif
