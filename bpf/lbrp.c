/* lbrp: the service load balancer, a transparent cube stacked on every pod's
 * port and on the router's host port (the node's own stack). On the ingress
 * hook (from the pod, or the node) it translates a service's virtual address
 * to a backend; on the egress hook (to the pod) it translates the backend's
 * replies back, so the pod only ever sees the virtual address.
 *
 * Like kube-proxy it masquerades what the backend could not answer directly
 * (kube-proxy's mark-for-masquerade): a pod that reaches itself through its
 * Service (hairpin, "ip saddr <endpoint> jump mark-for-masquerade") and the
 * node's own connections ("masquerade local traffic"). Traffic to another
 * port of a Service address is rejected and traffic to an unallocated
 * address of the Service range dropped, as kube-proxy's nftables mode does
 * ("Reject traffic to invalid ports of ClusterIPs", "Drop traffic to
 * unallocated ClusterIPs").
 *
 * A fragmented TCP or UDP datagram is translated whole (pcn_frag.h): its
 * first fragment picks the backend and is rewritten as any packet is (the L4
 * checksum lives in it); the later ones take its ports from the fragment
 * record, find the same session and get the same addresses. Fragments that
 * cannot be translated so (a tiny first fragment, an overlapping or
 * out-of-order later one, a later one for a service whose first fragment
 * made no session) are dropped, never sent on to a virtual address. */
#include "pcn_chain.h"
#include "pcn_parse.h"
#include "pcn_frag.h"
#include "pcn_nat.h"
#include "pcn_lb.h"
#include "pcn_reject.h"
#include "pcn_icmperr.h"

#define LBRP_LOOPBACK_IFINDEX 1 /* the kernel's LOOPBACK_IFINDEX: lo, in every namespace */

/* An lbrp instance's view of its node (written by the agent). */
struct lbrp_cfg {
    __be32 svc_net;         /* the Service range; mask 0: none, nothing rejected */
    __be32 svc_mask;
    __be32 hairpin_ip;      /* the pods' gateway: source of a pod's connection to itself */
    __be32 node_ip;
    __be32 host_pod_ip;     /* the node's address in its pod CIDR, routed back by every node */
    __be32 local_pods;      /* this node's pod CIDR */
    __be32 local_pods_mask;
    u32 host_port;          /* the router's port to the node's stack (0: none) */
    u16 masq_lo, masq_hi;   /* ports of masqueraded sessions, host order */
};

BPF_TABLE_PINNED("hash", u32, struct lbrp_cfg, lb_cfgs, 64, PCN_PIN("lb_cfgs"));

/* Apply a recorded translation: its own side, then the optional other one. */
static __always_inline int lbrp_apply(struct __sk_buff *skb, struct pcn_flow *f,
                                      const struct pcn_l4info *info, const struct pcn_xlate *x)
{
    __be32 ip = x->ip, ip2 = x->ip2;
    __be16 port = x->port, port2 = x->port2;
    if (x->is_src) {
        if (pcn_nat_rewrite(skb, f, info, 1, ip, port) < 0)
            return -1;
        f->saddr = ip;
        f->sport = port;
        if (ip2) {
            if (pcn_nat_rewrite(skb, f, info, 0, ip2, port2) < 0)
                return -1;
            f->daddr = ip2;
            f->dport = port2;
        }
        return 0;
    }
    if (pcn_nat_rewrite(skb, f, info, 0, ip, port) < 0)
        return -1;
    f->daddr = ip;
    f->dport = port;
    if (ip2) {
        if (pcn_nat_rewrite(skb, f, info, 1, ip2, port2) < 0)
            return -1;
        f->saddr = ip2;
        f->sport = port2;
    }
    return 0;
}

static __always_inline int lbrp_on_host_port(struct __sk_buff *skb, const struct lbrp_cfg *cfg)
{
    return cfg && cfg->host_port && pcn_meta_port(skb) == cfg->host_port;
}

/* 127.0.0.0/8: a hostPort on 127.0.0.1 (hostIP, or none) serves the node's
 * own stack on loopback, as the portmap plugin does with route_localnet. */
static __always_inline int lbrp_is_loopback(__be32 ip)
{
    return (ip & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
}

/* A packet for the node's own stack that now comes from the node's own
 * address (the answer to its connection to a NodePort or hostPort on that
 * address) or from a loopback address (a hostPort on 127.0.0.1): the kernel
 * takes such a source only from loopback, so it goes in through lo (lo's MAC
 * is all zeros) instead of the host link. */
static __always_inline int lbrp_to_host(struct __sk_buff *skb, const struct lbrp_cfg *cfg,
                                        __be32 saddr)
{
    if (!lbrp_on_host_port(skb, cfg) || (saddr != cfg->node_ip && !lbrp_is_loopback(saddr)))
        return -1;
    u8 zero[ETH_ALEN] = {};
    if (bpf_skb_store_bytes(skb, 0, zero, ETH_ALEN, 0) < 0)
        return TC_ACT_SHOT;
    return bpf_redirect(LBRP_LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

static __always_inline int lbrp_reject(struct __sk_buff *skb, const struct pcn_flow *f,
                                       const struct pcn_l4info *info,
                                       const struct lbrp_cfg *cfg)
{
    if (lbrp_on_host_port(skb, cfg) &&
        (f->daddr == cfg->node_ip || lbrp_is_loopback(f->daddr))) {
        pcn_count_drop(pcn_meta_port(skb), pcn_meta_instance(skb), PCN_DROP_REJECTED);
        if (pcn_reject_answer(skb, f, info) < 0)
            return TC_ACT_SHOT;
        return lbrp_to_host(skb, cfg, f->daddr);
    }
    return pcn_reject_back(skb, f, info); /* back to the pod that asked */
}

/* Not a service: an address of the Service range gets kube-proxy's verdict
 * (another port of a Service address: reject; an unallocated address: drop);
 * anything else goes on. Returns -1 for "goes on". */
static __always_inline int lbrp_no_service(struct __sk_buff *skb, const struct pcn_flow *f,
                                           const struct pcn_l4info *info,
                                           const struct lbrp_cfg *cfg)
{
    if (!cfg || !cfg->svc_mask || (f->daddr & cfg->svc_mask) != cfg->svc_net)
        return -1;
    __be32 vip = f->daddr;
    if (lb_vips.lookup(&vip))
        return lbrp_reject(skb, f, info, cfg);
    return pcn_filter_drop(skb, PCN_DROP_NO_BACKEND);
}

/* A pod's flow straight to an address and port that are the backend of one
 * of its service sessions, from the same port: the replies of this new flow
 * are the wire tuple of that session's reverse entry, which would rewrite
 * them to come from the VIP (and the pod would never see its answer). A pod
 * opening a connection (a SYN) or sending a datagram on those ports is done
 * with the old one: both of its entries go. */
static __always_inline void lbrp_forget_superseded(const struct pcn_flow *f,
                                                   const struct pcn_l4info *info)
{
    if (f->proto == IPPROTO_TCP &&
        (info->tcp_flags & (PCN_TCP_SYN | PCN_TCP_ACK | PCN_TCP_RST)) != PCN_TCP_SYN)
        return;
    struct pcn_flow rev = {.saddr = f->daddr, .daddr = f->saddr, .sport = f->dport,
                           .dport = f->sport, .proto = f->proto};
    struct pcn_xlate *x = lb_sessions.lookup(&rev);
    if (!x || x->kind != PCN_SESS_LB_REV)
        return;
    struct pcn_flow fwd = {.saddr = f->saddr, .daddr = x->ip, .sport = f->sport,
                           .dport = x->port, .proto = f->proto};
    lb_sessions.delete(&rev);
    struct pcn_xlate *old = lb_sessions.lookup(&fwd);
    if (old && old->kind == PCN_SESS_LB && old->ip == f->daddr && old->port == f->dport)
        lb_sessions.delete(&fwd);
}

/* The address a new service flow must come from for its backend's answer to
 * come back through this lbrp, or 0 when the client's own will do:
 *  - a pod that is its own backend would get its own address as the source
 *    and drop the packet: it comes from the pods' gateway instead (kube-proxy
 *    masquerades hairpin traffic to the bridge's address);
 *  - the node's own connection (host port) is masqueraded as kube-proxy
 *    does: to the node's address for a backend on this node (the router
 *    sends it to the host port), to the node's pod-network address for one
 *    on another node (routed back to this node over the overlay);
 *  - unless its backend is the node itself (a hostNetwork endpoint here, the
 *    API server of the kubernetes Service on a control-plane node): from any
 *    address of the node, the answer would be delivered locally without
 *    coming back through this lbrp. It comes from the pods' gateway, which
 *    the node routes to the router, as a pod reaching itself does. */
static __always_inline __be32 lbrp_masq_addr(struct __sk_buff *skb, const struct lbrp_cfg *cfg,
                                             const struct pcn_flow *f,
                                             const struct pcn_backend *b)
{
    if (!cfg)
        return 0;
    if (lbrp_on_host_port(skb, cfg)) {
        if (b->ip == cfg->node_ip)
            return cfg->hairpin_ip;
        return (b->ip & cfg->local_pods_mask) == cfg->local_pods ? cfg->node_ip
                                                                 : cfg->host_pod_ip;
    }
    if (b->ip == f->saddr)
        return cfg->hairpin_ip;
    return 0;
}

/* Reserve a port on `ip` for the answers of backend `b` to the flow `f`
 * opened by a packet with TCP `flags`: inserts the reverse session `back`,
 * so that two sessions never share one; a port whose connection is over is
 * taken over, as the k8sdispatcher's masquerading does (disp_alloc_port).
 * Returns the port (network order) or 0 when none of the tries is free. */
static __always_inline __be16 lbrp_masq_port(const struct pcn_flow *f, const struct lbrp_cfg *cfg,
                                             __be32 ip, const struct pcn_backend *b,
                                             struct pcn_xlate *back, u64 now, u8 flags)
{
    u16 lo = cfg->masq_lo, hi = cfg->masq_hi;
    u32 range = hi >= lo ? (u32)(hi - lo) + 1 : 1;
    u32 h = pcn_flow_hash(f);
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < PCN_PORT_TRIES + PCN_PORT_HARDER; i++) {
        __be16 port = pcn_port_try(h, i, lo, range);
        struct pcn_flow rev = {.saddr = b->ip, .daddr = ip, .sport = b->port, .dport = port,
                               .proto = f->proto};
        if (lb_sessions.insert(&rev, back) == 0)
            return port;
        struct pcn_xlate *old = lb_sessions.lookup(&rev);
        if (old && pcn_lb_take_over(&rev, old, back, now, flags, i >= PCN_PORT_TRIES))
            return port;
    }
    return 0;
}

static __always_inline int lbrp_forward(struct __sk_buff *skb, struct pcn_flow *f,
                                        struct pcn_l4info *info, u64 now)
{
    u32 inst = pcn_meta_instance(skb);
    struct lbrp_cfg *cfg = lb_cfgs.lookup(&inst);
    struct pcn_xlate *x = pcn_lb_session(f, info, PCN_SESS_LB, PCN_SESS_LB_HAIRPIN_REV, now);
    if (x) {
        if (lbrp_apply(skb, f, info, x) < 0)
            return pcn_filter_drop(skb, PCN_DROP_REWRITE);
        /* the node's answer to its own connection to a service whose
         * backend is the node itself (a hairpin on the host port) */
        int r = x->kind == PCN_SESS_LB_HAIRPIN_REV ? lbrp_to_host(skb, cfg, f->saddr) : -1;
        return r >= 0 ? r : pcn_pass(skb);
    }
    struct pcn_svc_key sk = {.vip = f->daddr, .port = f->dport, .proto = f->proto,
                             .scope = PCN_SVC_INTERNAL};
    struct pcn_svc *svc = lb_services.lookup(&sk);
    if (info->is_fragment) {
        /* Sessions start with a datagram's first fragment: without one (it
         * was rejected, or the session is gone) a later fragment has nowhere
         * to go but the virtual address. */
        if (svc)
            return pcn_filter_drop(skb, PCN_DROP_FRAGMENT);
        return pcn_pass(skb);
    }
    if (!svc) {
        int r = lbrp_no_service(skb, f, info, cfg);
        if (r >= 0)
            return r;
        lbrp_forget_superseded(f, info);
        return pcn_pass(skb);
    }
    struct pcn_backend b = {};
    if (pcn_lb_select(svc, f, now, &b) < 0) {
        if (svc->n_slots == 0 && (svc->flags & PCN_LB_DROP_EMPTY))
            return pcn_filter_drop(skb, PCN_DROP_NO_BACKEND);
        return lbrp_reject(skb, f, info, cfg);
    }

    u8 state = pcn_session_first(f->proto, info->tcp_flags);
    u32 born = pcn_now_ms(now);
    struct pcn_xlate to = {.ip = b.ip, .port = b.port, .is_src = 0, .kind = PCN_SESS_LB,
                           .state = state, .svc = svc->id, .born_ms = born, .seen_ns = now};
    struct pcn_xlate back = {.ip = f->daddr, .port = f->dport, .is_src = 1,
                             .kind = PCN_SESS_LB_REV, .state = state, .svc = svc->id,
                             .born_ms = born, .seen_ns = now};
    __be32 masq = lbrp_masq_addr(skb, cfg, f, &b);
    if (masq && cfg) {
        /* the answer comes to masq:port and goes back to the client */
        back.ip2 = f->saddr;
        back.port2 = f->sport;
        /* the answer comes back by the ingress hook it left by */
        if (masq == cfg->hairpin_ip)
            back.kind = PCN_SESS_LB_HAIRPIN_REV;
        __be16 port = lbrp_masq_port(f, cfg, masq, &b, &back, now, info->tcp_flags);
        if (!port)
            return pcn_filter_drop(skb, PCN_DROP_NAT_EXHAUSTED);
        to.ip2 = masq;
        to.port2 = port;
        lb_sessions.update(f, &to);
    } else {
        struct pcn_flow rev = {.saddr = b.ip, .daddr = f->saddr, .sport = b.port,
                               .dport = f->sport, .proto = f->proto};
        pcn_lb_record(f, &to, &rev, &back);
    }
    if (lbrp_apply(skb, f, info, &to) < 0)
        return pcn_filter_drop(skb, PCN_DROP_REWRITE);
    return pcn_pass(skb);
}

static __always_inline int lbrp_reverse(struct __sk_buff *skb, struct pcn_flow *f,
                                        struct pcn_l4info *info, u64 now)
{
    struct pcn_xlate *x = pcn_lb_session(f, info, PCN_SESS_LB_REV, 0, now);
    if (!x)
        return pcn_pass(skb);
    if (lbrp_apply(skb, f, info, x) < 0)
        return pcn_filter_drop(skb, PCN_DROP_REWRITE);
    u32 inst = pcn_meta_instance(skb);
    int r = lbrp_to_host(skb, lb_cfgs.lookup(&inst), f->saddr);
    return r >= 0 ? r : pcn_pass(skb);
}

/* An ICMP error about a service connection: towards the client (egress hook)
 * it quotes the packet as the backend got it, towards a backend (ingress
 * hook, the client reporting, or a pod that is its own backend) as the
 * client got it. */
static __always_inline int lbrp_icmp_error(struct __sk_buff *skb, struct pcn_flow *f,
                                           struct pcn_l4info *info, u64 now)
{
    struct pcn_icmp_quote q = {};
    if (pcn_icmp_quote_parse(skb, f, info, &q) < 0)
        return pcn_pass(skb);
    struct pcn_flow key = {};
    pcn_icmp_quote_key(&q, &key);
    int ingress = pcn_meta_hook(skb) == PCN_HOOK_INGRESS;
    struct pcn_xlate *x = ingress
        ? pcn_lb_session_live(&key, PCN_SESS_LB, PCN_SESS_LB_HAIRPIN_REV, now)
        : pcn_lb_session_live(&key, PCN_SESS_LB_REV, 0, now);
    if (!x)
        return pcn_pass(skb);
    if (pcn_icmp_err_xlate(skb, f, info, &q, x) < 0)
        return pcn_filter_drop(skb, PCN_DROP_REWRITE);
    /* towards the node's own stack from its own address (see lbrp_reverse;
     * the node's own error about a hairpin of its own on the ingress hook) */
    if (!ingress || x->kind == PCN_SESS_LB_HAIRPIN_REV) {
        u32 inst = pcn_meta_instance(skb);
        int r = lbrp_to_host(skb, lb_cfgs.lookup(&inst), f->saddr);
        if (r >= 0)
            return r;
    }
    return pcn_pass(skb);
}

/* Neither TCP, UDP nor an ICMP error: a ping, say. Into the Service range it
 * gets kube-proxy's verdicts (rejected by a Service address, dropped by an
 * unallocated one); anything else goes on. */
static __always_inline int lbrp_other(struct __sk_buff *skb, const struct pcn_flow *f,
                                      const struct pcn_l4info *info)
{
    if (pcn_meta_hook(skb) != PCN_HOOK_INGRESS)
        return pcn_pass(skb);
    u32 inst = pcn_meta_instance(skb);
    int r = lbrp_no_service(skb, f, info, lb_cfgs.lookup(&inst));
    return r >= 0 ? r : pcn_pass(skb);
}

int lbrp_rx(struct __sk_buff *skb)
{
    struct pcn_flow f = {};
    struct pcn_l4info info = {};
    int parsed = pcn_parse_flow(skb, &f, &info);
    if (parsed == PCN_PARSE_NOT_IPV4)
        return pcn_pass(skb);
    u64 now = bpf_ktime_get_ns();
    if (f.proto == IPPROTO_ICMP) {
        if (parsed != PCN_PARSE_OK)
            return pcn_pass(skb);
        if (pcn_icmp_is_error(info.icmp_type))
            return lbrp_icmp_error(skb, &f, &info, now);
        return lbrp_other(skb, &f, &info);
    }
    if (f.proto != IPPROTO_TCP && f.proto != IPPROTO_UDP)
        return lbrp_other(skb, &f, &info);
    if (parsed == PCN_PARSE_SHORT)
        /* a tiny first fragment cannot be translated: the L4 checksum is not
         * in it; a truncated whole packet goes on as it is, to be refused */
        return info.first_fragment ? pcn_filter_drop(skb, PCN_DROP_FRAGMENT) : pcn_pass(skb);
    if (pcn_frag_resolve(pcn_meta_instance(skb), &f, &info, now) < 0)
        return pcn_filter_drop(skb, PCN_DROP_FRAGMENT);
    if (pcn_meta_hook(skb) == PCN_HOOK_INGRESS)
        return lbrp_forward(skb, &f, &info, now);
    return lbrp_reverse(skb, &f, &info, now);
}
