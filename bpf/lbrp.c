/* lbrp: the service load balancer, a transparent cube stacked on every pod's
 * port. On the ingress hook (from the pod) it translates a service's virtual
 * address to a backend; on the egress hook (to the pod) it translates the
 * backend's replies back, so the pod only ever sees the virtual address. */
#include "pcn_chain.h"
#include "pcn_parse.h"
#include "pcn_nat.h"
#include "pcn_lb.h"
#include "pcn_reject.h"
#include "pcn_icmperr.h"

static __always_inline int lbrp_reject(struct __sk_buff *skb, const struct pcn_flow *f,
                                       const struct pcn_l4info *info)
{
    u32 port_id = pcn_meta_port(skb);
    pcn_count_drop(port_id, pcn_meta_instance(skb), PCN_DROP_REJECTED);
    int r = f->proto == IPPROTO_TCP ? pcn_reject_tcp(skb, info) : pcn_reject_udp(skb, f, info);
    if (r < 0)
        return TC_ACT_SHOT;
    struct pcn_port *p = pcn_ports.lookup(&port_id);
    if (!p || p->peer_kind != PCN_PEER_NETDEV)
        return TC_ACT_SHOT;
    return bpf_redirect(p->peer, 0); /* back to the pod that asked */
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

static __always_inline int lbrp_forward(struct __sk_buff *skb, struct pcn_flow *f,
                                        struct pcn_l4info *info, u64 now)
{
    struct pcn_xlate *x = pcn_lb_session(f, info, PCN_SESS_LB, now);
    if (x) {
        if (pcn_nat_rewrite(skb, f, info, 0, x->ip, x->port) < 0)
            return pcn_filter_drop(skb, PCN_DROP_REWRITE);
        return pcn_pass(skb);
    }
    struct pcn_svc_key sk = {.vip = f->daddr, .port = f->dport, .proto = f->proto};
    struct pcn_svc *svc = lb_services.lookup(&sk);
    if (!svc) {
        lbrp_forget_superseded(f, info);
        return pcn_pass(skb);
    }
    struct pcn_backend b = {};
    if (pcn_lb_select(svc, f, now, &b) < 0)
        return lbrp_reject(skb, f, info);

    u8 state = pcn_session_first(f->proto, info->tcp_flags);
    u32 born = pcn_now_ms(now);
    struct pcn_xlate to = {.ip = b.ip, .port = b.port, .is_src = 0, .kind = PCN_SESS_LB,
                           .state = state, .svc = svc->id, .born_ms = born, .seen_ns = now};
    struct pcn_xlate back = {.ip = f->daddr, .port = f->dport, .is_src = 1,
                             .kind = PCN_SESS_LB_REV, .state = state, .svc = svc->id,
                             .born_ms = born, .seen_ns = now};
    struct pcn_flow rev = {.saddr = b.ip, .daddr = f->saddr, .sport = b.port,
                           .dport = f->sport, .proto = f->proto};
    pcn_lb_record(f, &to, &rev, &back);
    if (pcn_nat_rewrite(skb, f, info, 0, b.ip, b.port) < 0)
        return pcn_filter_drop(skb, PCN_DROP_REWRITE);
    return pcn_pass(skb);
}

static __always_inline int lbrp_reverse(struct __sk_buff *skb, struct pcn_flow *f,
                                        struct pcn_l4info *info, u64 now)
{
    struct pcn_xlate *x = pcn_lb_session(f, info, PCN_SESS_LB_REV, now);
    if (x) {
        if (pcn_nat_rewrite(skb, f, info, 1, x->ip, x->port) < 0)
            return pcn_filter_drop(skb, PCN_DROP_REWRITE);
    }
    return pcn_pass(skb);
}

/* An ICMP error about a service connection: towards the client (egress hook)
 * it quotes the packet as the backend got it, towards a backend (ingress
 * hook, the client reporting) as the client got it. */
static __always_inline int lbrp_icmp_error(struct __sk_buff *skb, struct pcn_flow *f,
                                           struct pcn_l4info *info, u64 now)
{
    struct pcn_icmp_quote q = {};
    if (pcn_icmp_quote_parse(skb, f, info, &q) < 0)
        return pcn_pass(skb);
    struct pcn_flow key = {};
    pcn_icmp_quote_key(&q, &key);
    u8 want = pcn_meta_hook(skb) == PCN_HOOK_INGRESS ? PCN_SESS_LB : PCN_SESS_LB_REV;
    struct pcn_xlate *x = pcn_lb_session_live(&key, want, now);
    if (!x)
        return pcn_pass(skb);
    if (pcn_icmp_err_xlate(skb, f, info, &q, x) < 0)
        return pcn_filter_drop(skb, PCN_DROP_REWRITE);
    return pcn_pass(skb);
}

int lbrp_rx(struct __sk_buff *skb)
{
    struct pcn_flow f = {};
    struct pcn_l4info info = {};
    if (pcn_parse_flow(skb, &f, &info) < 0 || info.is_fragment)
        return pcn_pass(skb);
    u64 now = bpf_ktime_get_ns();
    if (f.proto == IPPROTO_ICMP)
        return lbrp_icmp_error(skb, &f, &info, now);
    if (f.proto != IPPROTO_TCP && f.proto != IPPROTO_UDP)
        return pcn_pass(skb);
    if (pcn_meta_hook(skb) == PCN_HOOK_INGRESS)
        return lbrp_forward(skb, &f, &info, now);
    return lbrp_reverse(skb, &f, &info, now);
}
