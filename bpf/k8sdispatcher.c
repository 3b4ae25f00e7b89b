/* k8sdispatcher: the node's border with the outside world, a transparent cube
 * stacked on the router's uplink port (both hooks) and on its overlay port
 * (ingress hook).
 *
 *  uplink ingress (from the NIC): replies to masqueraded pod connections,
 *      NodePort traffic and hostPort traffic (a pod's `hostPort`, the CNI
 *      portMappings capability: translated like a NodePort with the Local
 *      policy and its one backend, at any port, outside the NodePort range
 *      too) go on to the router; everything else goes to the host stack
 *      untouched (TC_ACT_OK), the node's own traffic and VXLAN included.
 *  uplink egress (to the NIC): replies of local NodePort backends (the
 *      node's own hostNetwork servers too) get the node's address back; pod
 *      connections to the outside are masqueraded to the node address with a
 *      port of their own; ICMP errors about either, the router's
 *      "fragmentation needed" included, quote them translated back.
 *  overlay ingress: replies of remote NodePort backends (addressed to this
 *      node's VTEP address by the Cluster policy) are translated back to the
 *      client; those of backends that are other hosts come back through the
 *      uplink, to the node's address. With direct routing (no overlay port)
 *      the pods' return address is the node's pod CIDR network address
 *      (disp_cfg.vtep_ip), and their replies come through the uplink too:
 *      a remote pod answering the node's address would be masqueraded by
 *      its own node, whose no-SNAT set holds the pod and VTEP ranges only.
 *
 * A NodePort endpoint that is no pod (kube-proxy serves any endpoint address):
 * the node's own address (a hostNetwork server here) gets only its port
 * rewritten and goes to the host stack, whose answer the egress hook
 * translates back; any other address (another node's hostNetwork server, an
 * endpoint outside the cluster) is reached through the router from the
 * node's address (masqueraded as kube-proxy does), so that the answer comes
 * back here.
 *
 * Fragmented datagrams are translated whole (pcn_frag.h): the first fragment
 * is translated as any packet, the later ones take its ports from the
 * fragment record and get the same addresses from the same session.
 *
 * Nothing leaves with the address of a pod that must be masqueraded: a pod's
 * packet that cannot be translated is dropped and counted. That is a
 * protocol without ports (GRE, SCTP, ...; SCTP's checksum is a CRC32c over
 * the ports, which tc cannot recompute cheaply) or an ICMP message other than
 * an echo or timestamp query (an error about no connection we know:
 * PCN_DROP_NO_MASQUERADE), and a fragment whose datagram cannot be
 * translated (PCN_DROP_FRAGMENT).
 */
#include "pcn_chain.h"
#include "pcn_parse.h"
#include "pcn_frag.h"
#include "pcn_nat.h"
#include "pcn_lb.h"
#include "pcn_reject.h"
#include "pcn_icmperr.h"

#define DISP_POLICY_CLUSTER 0
#define DISP_POLICY_LOCAL 1
#define DISP_POLICY_HOSTPORT 2  /* a pod's hostPort: Local, at any port */
#define DISP_POLICY_ENDPOINT 3  /* no NodePort: the port of a NodePort's hostNetwork
                                 * endpoint here, whose direct flows may clash */
#define DISP_NET_POD 1       /* a pod network: its sources are masqueraded */
#define DISP_NET_NO_SNAT 2   /* inside the cluster: destinations never masqueraded */
#define DISP_KIND(k) (1u << (k)) /* a set of session kinds (pcn_session.h) */

struct disp_cfg {
    __be32 node_ip;
    __be32 vtep_ip;         /* what remote pod backends answer: VTEP, or pod CIDR .0 */
    __be32 local_pods;      /* this node's pod network */
    __be32 local_pods_mask;
    u32 uplink_port;
    u32 overlay_port;
    u16 np_lo, np_hi;       /* NodePort range, host order */
    u16 snat_lo, snat_hi;   /* masquerading ports, host order */
};

struct disp_net_key {
    u32 prefixlen; /* 32 (instance) + prefix */
    u32 inst;
    __be32 ip;
};

struct disp_np_key {
    u32 inst;
    __be16 port;
    u8 proto;
    u8 pad;
};

struct disp_np_rule {
    u32 policy;
};

BPF_TABLE_PINNED("hash", u32, struct disp_cfg, disp_cfgs, 64, PCN_PIN("disp_cfgs"));
BPF_TABLE_PINNED("lpm_trie", struct disp_net_key, u32, disp_nets, 1024, PCN_PIN("disp_nets"),
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct disp_np_key, struct disp_np_rule, disp_nodeports, 16384,
                 PCN_PIN("disp_nodeports"));
BPF_TABLE_PINNED("lru_hash", struct pcn_flow, struct pcn_xlate, nat_sessions, 262144,
                 PCN_PIN("nat_sessions"));

static __always_inline u32 disp_net_kind(u32 inst, __be32 ip)
{
    struct disp_net_key k = {.prefixlen = 64, .inst = inst, .ip = ip};
    u32 *v = disp_nets.lookup(&k);
    return v ? *v : 0;
}

/* Apply a recorded translation (one or two rewrites). */
static __always_inline int disp_apply(struct __sk_buff *skb, struct pcn_flow *f,
                                      struct pcn_l4info *info, struct pcn_xlate *x)
{
    if (pcn_nat_rewrite(skb, f, info, x->is_src, x->ip, x->port) < 0)
        return -1;
    if (x->is_src) {
        f->saddr = x->ip;
        f->sport = x->port;
    } else {
        f->daddr = x->ip;
        f->dport = x->port;
    }
    if (!x->ip2)
        return 0;
    if (pcn_nat_rewrite(skb, f, info, !x->is_src, x->ip2, x->port2) < 0)
        return -1;
    if (x->is_src) { /* `f` is the packet as it now is: disp_deliver looks */
        f->daddr = x->ip2;
        f->dport = x->port2;
    } else {
        f->saddr = x->ip2;
        f->sport = x->port2;
    }
    return 0;
}

/* The live session at `key` found as `x` (see pcn_lb_session_live). */
static __always_inline int disp_session_live(const struct pcn_flow *key, const struct pcn_xlate *x,
                                             const struct pcn_session_cfg *cfg, u64 now)
{
    if (pcn_session_age(cfg, key->proto, x, now) == PCN_AGE_LIVE)
        return 1;
    struct pcn_flow pk = {};
    pcn_session_peer_key(key, x, &pk);
    struct pcn_xlate *peer = nat_sessions.lookup(&pk);
    return pcn_session_pair_age(cfg, key, x, &pk, peer, now) == PCN_AGE_LIVE;
}

/* pcn_lb_session (pcn_lb.h) for nat_sessions, for the kinds in `kinds`
 * (DISP_KIND). */
static __always_inline struct pcn_xlate *disp_session(const struct pcn_flow *f,
                                                      const struct pcn_l4info *info, u32 kinds,
                                                      const struct pcn_session_cfg *cfg, u64 now)
{
    struct pcn_xlate *x = nat_sessions.lookup(f);
    if (!x || !(kinds & DISP_KIND(x->kind)))
        return NULL;
    struct pcn_flow pk = {};
    pcn_session_peer_key(f, x, &pk);
    struct pcn_xlate *peer = NULL;
    if (pcn_session_age(cfg, f->proto, x, now) != PCN_AGE_LIVE) {
        peer = nat_sessions.lookup(&pk);
        if (pcn_session_pair_age(cfg, f, x, &pk, peer, now) != PCN_AGE_LIVE)
            return NULL;
    }
    if (pcn_session_reopens(f->proto, x, info->tcp_flags)) {
        if (!peer)
            peer = nat_sessions.lookup(&pk);
        if (pcn_session_paired(f, x, &pk, peer))
            nat_sessions.delete(&pk);
        nat_sessions.delete(f);
        return NULL;
    }
    u8 next = pcn_session_next(f->proto, x->state, info->tcp_flags,
                               pcn_session_is_reply(x->kind), pcn_now_ms(now) - x->born_ms);
    if (next != x->state) {
        if (!peer)
            peer = nat_sessions.lookup(&pk);
        if (pcn_session_paired(f, x, &pk, peer))
            peer->state = next;
        x->state = next;
    }
    pcn_session_touch(cfg, f->proto, x, now);
    return x;
}

/* A packet of a connection translated before, or an ICMP error about one, in
 * one of the session kinds of this direction (`kinds`, DISP_KIND): 1 when
 * translated, 0 when it is not one of ours (or no longer: past its
 * lifetime), -1 when the rewrite failed. */
static __always_inline int disp_known(struct __sk_buff *skb, struct pcn_flow *f,
                                      struct pcn_l4info *info, u32 kinds, u64 now)
{
    const struct pcn_session_cfg *cfg = pcn_session_cfg();
    if (f->proto == IPPROTO_ICMP) {
        struct pcn_icmp_quote q = {};
        if (pcn_icmp_quote_parse(skb, f, info, &q) == 0) {
            struct pcn_flow key = {};
            pcn_icmp_quote_key(&q, &key);
            struct pcn_xlate *e = nat_sessions.lookup(&key);
            if (!e || !(kinds & DISP_KIND(e->kind)) ||
                !disp_session_live(&key, e, cfg, now))
                return 0;
            return pcn_icmp_err_xlate(skb, f, info, &q, e) < 0 ? -1 : 1;
        }
    }
    struct pcn_xlate *x = disp_session(f, info, kinds, cfg, now);
    if (!x)
        return 0;
    return disp_apply(skb, f, info, x) < 0 ? -1 : 1;
}

/* Give the reverse entry `old` at `rev` to a new connection (opened by a
 * packet with TCP `flags`) when pcn_session_takeable says its own is over;
 * the old connection's other entry goes too. pcn_lb.h's pcn_lb_take_over is
 * the same for lb_sessions. 1 when taken. */
static __always_inline int disp_take_over(const struct pcn_flow *rev, struct pcn_xlate *old,
                                          const struct pcn_xlate *rev_val,
                                          const struct pcn_session_cfg *cfg, u64 now, u8 flags,
                                          int harder)
{
    u64 seen = old->seen_ns;
    if (!pcn_session_is_reply(old->kind))
        return 0;
    struct pcn_flow pk = {};
    pcn_session_peer_key(rev, old, &pk);
    struct pcn_xlate *peer = nat_sessions.lookup(&pk);
    int take = pcn_session_takeable(cfg, rev, old, &pk, peer, now, flags, harder);
    if (take == PCN_TAKE_NO || !pcn_session_claim(old, seen, now))
        return 0;
    *old = *rev_val;
    if (take == PCN_TAKE_WITH_PEER)
        nat_sessions.delete(&pk);
    return 1;
}

/* Reserve a port on `ip` for traffic from `peer` (the far end as it will
 * reply) for the flow `f` opened by a packet with TCP `flags`: inserts the
 * reverse session so that two connections never share a port towards the
 * same peer; a port whose connection is over is taken over. Returns the
 * port (network order) or 0. */
static __always_inline __be16 disp_alloc_port(const struct pcn_flow *f, __be32 ip, __be32 peer,
                                              __be16 peer_port, u16 lo, u16 hi,
                                              struct pcn_xlate *rev_val, u64 now, u8 flags)
{
    const struct pcn_session_cfg *cfg = pcn_session_cfg();
    u32 range = hi >= lo ? (u32)(hi - lo) + 1 : 1;
    u32 h = pcn_flow_hash(f);
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < PCN_PORT_TRIES + PCN_PORT_HARDER; i++) {
        __be16 port = pcn_port_try(h, i, lo, range);
        struct pcn_flow rev = {.saddr = peer, .daddr = ip, .sport = peer_port, .dport = port,
                               .proto = f->proto};
        if (f->proto == IPPROTO_ICMP)
            rev.sport = port; /* echo replies carry the identifier in both places */
        if (nat_sessions.insert(&rev, rev_val) == 0)
            return port;
        struct pcn_xlate *old = nat_sessions.lookup(&rev);
        if (old && disp_take_over(&rev, old, rev_val, cfg, now, flags, i >= PCN_PORT_TRIES))
            return port;
    }
    return 0;
}

/* Whether the replies of flow `f` from `ip`:`port` (a backend on this node,
 * or the host itself) would have the wire tuple of a live session of
 * another flow: two clients behind one NAT, or a NodePort flow and a direct
 * one to its endpoint, may share a source port. Such a flow's source port is
 * remapped, as conntrack does for the newer of two clashing flows
 * (nf_nat_used_tuple). */
static __always_inline int disp_reply_clashes(const struct pcn_flow *f, __be32 ip, __be16 port,
                                              u64 now)
{
    struct pcn_flow rev = {.saddr = ip, .daddr = f->saddr, .sport = port, .dport = f->sport,
                           .proto = f->proto};
    struct pcn_xlate *old = nat_sessions.lookup(&rev);
    return old && disp_session_live(&rev, old, pcn_session_cfg(), now);
}

/* Whether the host has a connection of its own (a TCP socket past LISTEN, a
 * connected UDP socket) with the tuple that flow `f` takes once translated
 * to `ip`:`port`, the node's address: a direct flow to a hostNetwork
 * endpoint opened before a NodePort flow that would reuse its tuple, which
 * no session of ours records. */
static __always_inline int disp_host_conn(struct __sk_buff *skb, const struct pcn_flow *f,
                                          __be32 ip, __be16 port)
{
    struct bpf_sock_tuple t = {};
    t.ipv4.saddr = f->saddr;
    t.ipv4.daddr = ip;
    t.ipv4.sport = f->sport;
    t.ipv4.dport = port;
    struct bpf_sock *sk;
    if (f->proto == IPPROTO_TCP)
        sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    else
        sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    int conn = f->proto == IPPROTO_TCP ? sk->state != BPF_TCP_LISTEN
                                       : sk->state == BPF_TCP_ESTABLISHED;
    bpf_sk_release(sk);
    return conn;
}

/* A pod's new connection to the outside: masqueraded to the node's address,
 * or dropped when it cannot be (see the top of the file). */
static __always_inline int disp_snat(struct __sk_buff *skb, struct disp_cfg *cfg,
                                     struct pcn_flow *f, struct pcn_l4info *info, u64 now)
{
    if (info->is_fragment) /* its first fragment was not masqueraded: dropped, or none */
        return pcn_filter_drop(skb, PCN_DROP_FRAGMENT);
    if (f->proto == IPPROTO_ICMP &&
        info->icmp_type != ICMP_ECHO && info->icmp_type != ICMP_TIMESTAMP)
        return pcn_filter_drop(skb, PCN_DROP_NO_MASQUERADE);
    if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP && f->proto != IPPROTO_ICMP)
        return pcn_filter_drop(skb, PCN_DROP_NO_MASQUERADE);
    u8 state = pcn_session_first(f->proto, info->tcp_flags);
    u32 born = pcn_now_ms(now);
    struct pcn_xlate back = {.ip = f->saddr, .port = f->sport, .is_src = 0,
                             .kind = PCN_SESS_SNAT_REV, .state = state, .born_ms = born,
                             .seen_ns = now};
    __be16 port = disp_alloc_port(f, cfg->node_ip, f->daddr, f->dport, cfg->snat_lo,
                                  cfg->snat_hi, &back, now, info->tcp_flags);
    if (!port)
        return pcn_filter_drop(skb, PCN_DROP_NAT_EXHAUSTED);
    struct pcn_xlate to = {.ip = cfg->node_ip, .port = port, .is_src = 1, .kind = PCN_SESS_SNAT,
                           .state = state, .born_ms = born, .seen_ns = now};
    nat_sessions.update(f, &to);
    if (disp_apply(skb, f, info, &to) < 0)
        return pcn_filter_drop(skb, PCN_DROP_REWRITE);
    return pcn_pass(skb);
}

/* A translated packet from the uplink: to the host stack when it is now
 * for the node's own address (a hostNetwork endpoint here), else on to the
 * router. */
static __always_inline int disp_deliver(struct __sk_buff *skb, const struct disp_cfg *cfg,
                                        const struct pcn_flow *f)
{
    return f->daddr == cfg->node_ip ? TC_ACT_OK : pcn_pass(skb);
}

/* A NodePort's (or hostPort's) backend for the first packet of flow `f`:
 * -1 with `b` and `svc_id` set, else the verdict (not ours, rejected or
 * dropped). */
static __always_inline int disp_nodeport_select(struct __sk_buff *skb, const struct disp_cfg *cfg,
                                                const struct disp_np_rule *rule,
                                                struct pcn_flow *f, struct pcn_l4info *info,
                                                u64 now, struct pcn_backend *b, u32 *svc_id)
{
    /* A NodePort rule applies in the NodePort range only; a hostPort at any
     * port (kubelet keeps hostPorts and NodePorts apart, not the range). */
    u16 dport = bpf_ntohs(f->dport);
    if (rule->policy != DISP_POLICY_HOSTPORT && (dport < cfg->np_lo || dport > cfg->np_hi))
        return TC_ACT_OK;
    /* A hostPort may lie in the node's ephemeral range: a TCP segment that
     * opens no connection (no session of ours has it) is the host's own, an
     * answer to a connection it made from that port, as conntrack would
     * know it (the portmap plugin's DNAT sees only new connections). */
    if (rule->policy == DISP_POLICY_HOSTPORT && f->proto == IPPROTO_TCP &&
        (info->tcp_flags & (PCN_TCP_SYN | PCN_TCP_ACK)) != PCN_TCP_SYN)
        return TC_ACT_OK;
    /* Local and hostPort: this node's endpoints only (the external entry);
     * Cluster: all of them, as for the cluster's own traffic (the internal
     * one). */
    u8 scope = rule->policy == DISP_POLICY_CLUSTER ? PCN_SVC_INTERNAL : PCN_SVC_EXTERNAL;
    struct pcn_svc_key sk = {.vip = cfg->node_ip, .port = f->dport, .proto = f->proto,
                             .scope = scope};
    struct pcn_svc *svc = lb_services.lookup(&sk);
    if (!svc)
        return pcn_filter_drop(skb, PCN_DROP_NO_BACKEND);
    if (pcn_lb_select(svc, f, now, b) < 0) {
        /* kube-proxy: no endpoint at all is rejected; none here while other
         * nodes have some (Local) is dropped */
        if (svc->n_slots == 0 && !(svc->flags & PCN_LB_DROP_EMPTY))
            return pcn_reject_back(skb, f, info);
        return pcn_filter_drop(skb, PCN_DROP_NO_BACKEND);
    }
    *svc_id = svc->id;
    return -1;
}

/* Open flow `f` to backend `b` (of service `svc_id`; 0 for a direct flow
 * remapped, `clash`): both entries, then the packet translated. */
static __always_inline int disp_nodeport_open(struct __sk_buff *skb, u32 inst,
                                              const struct disp_cfg *cfg, struct pcn_flow *f,
                                              struct pcn_l4info *info, u64 now,
                                              const struct pcn_backend *b, u32 svc_id, int clash)
{
    u8 state = pcn_session_first(f->proto, info->tcp_flags);
    u32 born = pcn_now_ms(now);
    struct pcn_xlate to = {.ip = b->ip, .port = b->port, .is_src = 0,
                           .kind = PCN_SESS_NODEPORT, .state = state, .svc = svc_id,
                           .born_ms = born, .seen_ns = now};
    struct pcn_xlate back = {.ip = cfg->node_ip, .port = f->dport, .is_src = 1,
                             .kind = PCN_SESS_NODEPORT_REV, .state = state, .svc = svc_id,
                             .born_ms = born, .seen_ns = now};
    int pod = disp_net_kind(inst, b->ip) & DISP_NET_POD;
    int local = b->ip == cfg->node_ip || (b->ip & cfg->local_pods_mask) == cfg->local_pods;
    /* The backend answers an address of ours, never the client directly, so
     * the reply comes back through this node: our VTEP address over the
     * overlay for a pod, the node's address through the uplink for any other
     * host. A local one answers the client, at a port of its own when the
     * client's would clash (disp_reply_clashes). */
    __be32 via = pod ? cfg->vtep_ip : cfg->node_ip;
    if (local)
        via = clash || disp_reply_clashes(f, b->ip, b->port, now) ||
                      (b->ip == cfg->node_ip && disp_host_conn(skb, f, b->ip, b->port))
                  ? f->saddr
                  : 0;
    if (via) {
        back.ip2 = f->saddr;
        back.port2 = f->sport;
        __be16 port = disp_alloc_port(f, via, b->ip, b->port, cfg->snat_lo, cfg->snat_hi, &back,
                                      now, info->tcp_flags);
        if (!port)
            return pcn_filter_drop(skb, PCN_DROP_NAT_EXHAUSTED);
        to.ip2 = via;
        to.port2 = port;
    } else {
        struct pcn_flow rev = {.saddr = b->ip, .daddr = f->saddr, .sport = b->port,
                               .dport = f->sport, .proto = f->proto};
        nat_sessions.update(&rev, &back);
    }
    nat_sessions.update(f, &to);
    if (disp_apply(skb, f, info, &to) < 0)
        return pcn_filter_drop(skb, PCN_DROP_REWRITE);
    return disp_deliver(skb, cfg, f);
}

static __always_inline int disp_nodeport(struct __sk_buff *skb, u32 inst, struct disp_cfg *cfg,
                                         struct pcn_flow *f, struct pcn_l4info *info, u64 now)
{
    struct disp_np_key nk = {.inst = inst, .port = f->dport, .proto = f->proto};
    struct disp_np_rule *rule = disp_nodeports.lookup(&nk);
    if (!rule)
        return TC_ACT_OK; /* a port of the host's own */
    struct pcn_backend b = {};
    u32 svc_id = 0;
    int clash = 0;
    if (rule->policy == DISP_POLICY_ENDPOINT) {
        /* A flow from outside straight to the port of a NodePort's
         * hostNetwork endpoint here: the host's own, untouched, unless its
         * replies clash with a NodePort session's (then remapped below). Only
         * its first packet gets here: later ones are known (disp_known). */
        if ((f->proto == IPPROTO_TCP &&
             (info->tcp_flags & (PCN_TCP_SYN | PCN_TCP_ACK | PCN_TCP_RST)) != PCN_TCP_SYN) ||
            !disp_reply_clashes(f, f->daddr, f->dport, now))
            return TC_ACT_OK;
        b.ip = f->daddr;
        b.port = f->dport;
        clash = 1;
    } else {
        int r = disp_nodeport_select(skb, cfg, rule, f, info, now, &b, &svc_id);
        if (r >= 0)
            return r;
    }
    return disp_nodeport_open(skb, inst, cfg, f, info, now, &b, svc_id, clash);
}

static __always_inline int disp_from_overlay(struct __sk_buff *skb, u32 inst, struct disp_cfg *cfg,
                                             u64 now)
{
    struct pcn_flow f = {};
    struct pcn_l4info info = {};
    int parsed = pcn_parse_flow(skb, &f, &info);
    if (parsed == PCN_PARSE_NOT_IPV4 || f.daddr != cfg->vtep_ip)
        return pcn_pass(skb); /* pod to pod: most of what comes over the overlay */
    /* Replies of remote NodePort backends come here; what cannot be one (a
     * tiny first fragment, a later one of no datagram we know) goes on to
     * the router, which answers only echo requests to its own address. */
    if (parsed == PCN_PARSE_SHORT || pcn_frag_resolve(inst, &f, &info, now) < 0)
        return pcn_pass(skb);
    if (disp_known(skb, &f, &info, DISP_KIND(PCN_SESS_NODEPORT_REV), now) < 0)
        return pcn_filter_drop(skb, PCN_DROP_REWRITE);
    return pcn_pass(skb);
}

static __always_inline int disp_from_uplink(struct __sk_buff *skb, u32 inst,
                                            struct disp_cfg *cfg, u64 now)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;
    if (eth->h_proto == bpf_htons(PCN_ETH_P_ARP))
        return pcn_pass(skb); /* the router learns neighbours, then hands it to the host */
    struct pcn_flow f = {};
    struct pcn_l4info info = {};
    int parsed = pcn_parse_flow(skb, &f, &info);
    if (parsed == PCN_PARSE_NOT_IPV4)
        return TC_ACT_OK;
    if (f.daddr == cfg->node_ip) {
        if (parsed == PCN_PARSE_SHORT) /* a tiny first fragment cannot be translated */
            return info.first_fragment ? pcn_filter_drop(skb, PCN_DROP_FRAGMENT) : TC_ACT_OK;
        /* a later fragment whose first one is unknown is no translated
         * datagram's: the host's own, if anyone's */
        if (pcn_frag_resolve(inst, &f, &info, now) < 0)
            return TC_ACT_OK;
        /* NODEPORT_REV: answers of a NodePort endpoint that is another host */
        int r = disp_known(skb, &f, &info,
                           DISP_KIND(PCN_SESS_SNAT_REV) | DISP_KIND(PCN_SESS_NODEPORT) |
                               DISP_KIND(PCN_SESS_NODEPORT_REV),
                           now);
        if (r)
            return r < 0 ? pcn_filter_drop(skb, PCN_DROP_REWRITE) : disp_deliver(skb, cfg, &f);
        if ((f.proto == IPPROTO_TCP || f.proto == IPPROTO_UDP) && !info.is_fragment)
            return disp_nodeport(skb, inst, cfg, &f, &info, now);
        return TC_ACT_OK;
    }
    if (disp_net_kind(inst, f.daddr) & DISP_NET_POD)
        return pcn_pass(skb); /* routed straight to a pod (direct routing) */
    return TC_ACT_OK;
}

static __always_inline int disp_to_uplink(struct __sk_buff *skb, u32 inst, struct disp_cfg *cfg,
                                          u64 now)
{
    struct pcn_flow f = {};
    struct pcn_l4info info = {};
    int parsed = pcn_parse_flow(skb, &f, &info);
    if (parsed == PCN_PARSE_NOT_IPV4)
        return pcn_pass(skb);
    /* The host's own traffic (from the node's address) is left alone but
     * for what is ours: the answers of a hostNetwork server that is a
     * NodePort's endpoint get the NodePort back, and so do ICMP errors about
     * a NodePort's connection: the host's own about one to that server, or
     * the router's "fragmentation needed" about a packet it could not send
     * on (router.c), which comes from this port's address, the node's, and
     * quotes the packet as translated on its way in (a NodePort's backend;
     * with the Cluster policy also our address as its source, which is then
     * the error's destination too). Errors about the host's own flows quote
     * flows no session of ours is keyed by. A pod's packet to the outside
     * leaves masqueraded, or not at all. */
    int host = f.saddr == cfg->node_ip;
    int masq = !host && (disp_net_kind(inst, f.saddr) & DISP_NET_POD) &&
               !(disp_net_kind(inst, f.daddr) & DISP_NET_NO_SNAT);
    if (parsed == PCN_PARSE_SHORT) {
        if (!masq)
            return pcn_pass(skb);
        return pcn_filter_drop(skb, info.first_fragment ? PCN_DROP_FRAGMENT : PCN_DROP_PARSE);
    }
    if (pcn_frag_resolve(inst, &f, &info, now) < 0)
        return masq ? pcn_filter_drop(skb, PCN_DROP_FRAGMENT) : pcn_pass(skb);
    if (host && f.proto != IPPROTO_TCP && f.proto != IPPROTO_UDP &&
        !(f.proto == IPPROTO_ICMP && pcn_icmp_is_error(info.icmp_type)))
        return pcn_pass(skb);
    int r = disp_known(skb, &f, &info,
                       DISP_KIND(PCN_SESS_SNAT) | DISP_KIND(PCN_SESS_NODEPORT_REV), now);
    if (r)
        return r < 0 ? pcn_filter_drop(skb, PCN_DROP_REWRITE) : pcn_pass(skb);
    if (masq)
        return disp_snat(skb, cfg, &f, &info, now);
    return pcn_pass(skb);
}

/* With direct routing (no overlay port), an IPv4 packet from the uplink to
 * the pods' return address (disp_cfg.vtep_ip: the pod CIDR's network
 * address): remote pods' replies, which disp_from_overlay handles as it does
 * those that come over VXLAN to the VTEP. */
static __always_inline int disp_direct_return(struct __sk_buff *skb, const struct disp_cfg *cfg)
{
    if (cfg->overlay_port)
        return 0;
    /* Read in place, as pcn_parse_flow (which the handlers run next) reads
     * them: this runs on every packet the NIC receives with direct routing,
     * and two bpf_skb_load_bytes calls (helper call and copy each) did before. */
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return 0;
    return eth->h_proto == bpf_htons(PCN_ETH_P_IP) && ip->daddr == cfg->vtep_ip;
}

int k8sdispatcher_rx(struct __sk_buff *skb)
{
    u32 inst = pcn_meta_instance(skb);
    struct disp_cfg *cfg = disp_cfgs.lookup(&inst);
    if (!cfg)
        return pcn_pass(skb);
    u32 port = pcn_meta_port(skb);
    u64 now = bpf_ktime_get_ns();
    int ingress = pcn_meta_hook(skb) == PCN_HOOK_INGRESS;
    /* One call site per handler: each is inlined, and a second copy of one
     * would double its share of the program. */
    int pods_return = ingress && port == cfg->uplink_port && disp_direct_return(skb, cfg);
    if (port == cfg->uplink_port && !pods_return)
        return ingress ? disp_from_uplink(skb, inst, cfg, now) : disp_to_uplink(skb, inst, cfg, now);
    if (ingress && (port == cfg->overlay_port || pods_return))
        return disp_from_overlay(skb, inst, cfg, now);
    return pcn_pass(skb);
}
