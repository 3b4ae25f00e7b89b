/* Sessions: per-connection translation state, kept in pinned LRU tables so a
 * restarted agent finds every established connection where it left it.
 * Keyed by the flow exactly as it appears on the wire in one direction.
 *
 * A connection is two entries, one per direction, each naming the other
 * (pcn_session_peer_key). Like a conntrack entry, a connection has a state,
 * kept the same in both entries and advanced by the packets of both
 * directions, and its state decides how long it lives without traffic (the
 * lifetimes of Linux conntrack, nf_conntrack_proto_{tcp,udp,icmp}.c, with
 * kube-proxy's values where it sets them; session_cfg overrides them). A
 * connection past its lifetime is over: the data path treats it as absent (a
 * new packet on its ports starts a new connection, and its masquerading port
 * may be taken by another one), and the agent's garbage collector removes it
 * (operator/pcn_agent/dataplane/sessions.py mirrors these rules). */
#ifndef PCN_SESSION_H
#define PCN_SESSION_H

#include "pcn_helpers.h"
#include "pcn_parse.h"

/* What to write into a packet of the session: the new source or destination. */
struct pcn_xlate {
    __be32 ip;
    __be16 port;
    u8 is_src;    /* rewrite the source (1) or the destination (0) */
    u8 kind;      /* which cube logic created it; mirrored by SessionKind */
    __be32 ip2;   /* optional second rewrite, of the other side (0 = none) */
    __be16 port2;
    u8 state;     /* PCN_CT_*: where the connection is in its life */
    u8 pad;
    u32 svc;      /* service id for load-balanced sessions */
    u32 born_ms;  /* when the connection began: monotonic clock, ms, low 32 bits */
    u64 seen_ns;  /* last packet of this direction (refreshed at most every ~1 s) */
};

/* Kinds: odd ones translate the direction that opened the connection, the
 * next even one its replies. */
#define PCN_SESS_LB 1         /* client -> VIP translated to a backend */
#define PCN_SESS_LB_REV 2     /* backend replies translated back to the VIP */
#define PCN_SESS_SNAT 3       /* pod egress masqueraded to the node */
#define PCN_SESS_SNAT_REV 4
#define PCN_SESS_NODEPORT 5
#define PCN_SESS_NODEPORT_REV 6
/* The reply of a pod that is its own service's backend: it leaves the pod as
 * the pod sent it (to the masquerading address) and is translated on its way
 * out, back to "from the service, to the pod" (lbrp). */
#define PCN_SESS_LB_HAIRPIN_REV 7

/* States, as conntrack names them (LAST_ACK lives as long as TIME_WAIT). UDP
 * and ICMP use the first three: no reply yet, replied, and (UDP) a stream:
 * traffic after a reply, 2 s or more after the first packet (conntrack's
 * rule since Linux 5.0, so that DNS exchanges keep the short lifetime). */
#define PCN_CT_NONE 0 /* recorded before sessions had states: the long lifetime */
#define PCN_CT_SYN_SENT 1
#define PCN_CT_SYN_RECV 2
#define PCN_CT_ESTABLISHED 3
#define PCN_CT_FIN_WAIT 4   /* the opening side closed (its FIN) */
#define PCN_CT_CLOSE_WAIT 5 /* only the answering side closed */
#define PCN_CT_TIME_WAIT 6  /* both sides closed, the last FIN acknowledged */
#define PCN_CT_CLOSE 7      /* reset */
#define PCN_CT_LAST_ACK 8   /* both sides closed, the last FIN not yet acknowledged */
#define PCN_CT_UNREPLIED PCN_CT_SYN_SENT
#define PCN_CT_REPLIED PCN_CT_SYN_RECV
#define PCN_CT_STREAM PCN_CT_ESTABLISHED
#define PCN_CT_UDP_STREAM_AFTER_MS 2000

/* Lifetimes, by slot: the defaults are conntrack's (nf_conntrack-sysctl),
 * ESTABLISHED and CLOSE_WAIT kube-proxy's (--conntrack-tcp-timeout-established
 * 24h, --conntrack-tcp-timeout-close-wait 1h). */
#define PCN_LT_TCP_SYN_SENT 0
#define PCN_LT_TCP_SYN_RECV 1
#define PCN_LT_TCP_ESTABLISHED 2
#define PCN_LT_TCP_FIN_WAIT 3
#define PCN_LT_TCP_CLOSE_WAIT 4
#define PCN_LT_TCP_TIME_WAIT 5
#define PCN_LT_TCP_CLOSE 6
#define PCN_LT_UDP 7
#define PCN_LT_UDP_STREAM 8
#define PCN_LT_ICMP 9
#define PCN_LIFETIMES 10

#define PCN_NS_PER_S 1000000000ULL

/* Written by the agent (maps.SessionCfg); a zero lifetime means the default. */
struct pcn_session_cfg {
    u64 lifetime_ns[PCN_LIFETIMES];
    /* How long past its lifetime an entry may still be taken over by the data
     * path (a masquerading port reused in place); older ones belong to the
     * garbage collector alone, which thus never deletes an entry the data
     * path has just given to a new connection. 0: no collector runs, the
     * data path may take over any entry past its lifetime. */
    u64 grace_ns;
};

BPF_TABLE_PINNED("array", u32, struct pcn_session_cfg, session_cfg, 1, PCN_PIN("session_cfg"));

#define PCN_SESSION_REFRESH_NS PCN_NS_PER_S

static __always_inline const struct pcn_session_cfg *pcn_session_cfg(void)
{
    u32 zero = 0;
    return session_cfg.lookup(&zero);
}

static __always_inline u64 pcn_session_default_s(u32 slot)
{
    switch (slot) {
    case PCN_LT_TCP_SYN_SENT: return 120;
    case PCN_LT_TCP_SYN_RECV: return 60;
    case PCN_LT_TCP_ESTABLISHED: return 86400;
    case PCN_LT_TCP_FIN_WAIT: return 120;
    case PCN_LT_TCP_CLOSE_WAIT: return 3600;
    case PCN_LT_TCP_TIME_WAIT: return 120;
    case PCN_LT_TCP_CLOSE: return 10;
    case PCN_LT_UDP: return 30;
    case PCN_LT_UDP_STREAM: return 120;
    default: return 30; /* ICMP */
    }
}

static __always_inline u32 pcn_session_slot(u8 proto, u8 state)
{
    if (proto == IPPROTO_TCP) {
        if (state == PCN_CT_LAST_ACK)
            return PCN_LT_TCP_TIME_WAIT;
        if (state == PCN_CT_NONE || state > PCN_CT_CLOSE)
            return PCN_LT_TCP_ESTABLISHED;
        return state - 1; /* SYN_SENT..CLOSE are slots 0..6 */
    }
    if (proto == IPPROTO_UDP)
        return state == PCN_CT_UNREPLIED || state == PCN_CT_REPLIED ? PCN_LT_UDP
                                                                   : PCN_LT_UDP_STREAM;
    return PCN_LT_ICMP;
}

static __always_inline u64 pcn_session_lifetime(const struct pcn_session_cfg *cfg, u8 proto,
                                                u8 state)
{
    u32 slot = pcn_session_slot(proto, state);
    u64 ns = 0;
    /* keep the bound check the compiler would prove redundant: the verifier cannot */
    asm volatile("" : "+r"(slot));
    if (cfg && slot < PCN_LIFETIMES)
        ns = cfg->lifetime_ns[slot];
    return ns ? ns : pcn_session_default_s(slot) * PCN_NS_PER_S;
}

#define PCN_AGE_LIVE 0
#define PCN_AGE_EXPIRED 1 /* past its lifetime, within the grace */
#define PCN_AGE_DEAD 2    /* past its lifetime and the grace: the collector's */

/* How long ago `seen` was: signed, as another CPU may have written a `now`
 * later than ours. */
static __always_inline s64 pcn_since(u64 seen, u64 now)
{
    return (s64)(now - seen);
}

/* How one entry stands at `now` on its own. */
static __always_inline int pcn_session_age(const struct pcn_session_cfg *cfg, u8 proto,
                                           const struct pcn_xlate *x, u64 now)
{
    s64 idle = pcn_since(x->seen_ns, now);
    s64 life = (s64)pcn_session_lifetime(cfg, proto, x->state);
    if (idle <= life)
        return PCN_AGE_LIVE;
    s64 grace = cfg ? (s64)cfg->grace_ns : 0;
    if (grace && idle - life > grace)
        return PCN_AGE_DEAD;
    return PCN_AGE_EXPIRED;
}

/* The key of the other direction's entry: the reply to a packet of `k` once
 * `x` translated it. ICMP echo carries its identifier as both ports. */
static __always_inline void pcn_session_peer_key(const struct pcn_flow *k,
                                                 const struct pcn_xlate *x, struct pcn_flow *peer)
{
    __be32 saddr = k->saddr, daddr = k->daddr;
    __be16 sport = k->sport, dport = k->dport;
    if (x->is_src) {
        saddr = x->ip;
        sport = x->port;
        if (x->ip2) {
            daddr = x->ip2;
            dport = x->port2;
        }
    } else {
        daddr = x->ip;
        dport = x->port;
        if (x->ip2) {
            saddr = x->ip2;
            sport = x->port2;
        }
    }
    if (k->proto == IPPROTO_ICMP) {
        __be16 id = x->ip2 ? x->port2 : x->port;
        sport = id;
        dport = id;
    }
    peer->saddr = daddr;
    peer->daddr = saddr;
    peer->sport = dport;
    peer->dport = sport;
    peer->proto = k->proto;
    peer->pad[0] = peer->pad[1] = peer->pad[2] = 0;
}

/* Which kinds are the two halves of one connection: LB and LB_REV, SNAT and
 * SNAT_REV, NODEPORT and NODEPORT_REV, and LB with LB_HAIRPIN_REV (a hairpin
 * connection's reply half; odd as it is looked up on the opening side's hook). */
static __always_inline int pcn_session_kinds_pair(u8 kind, u8 peer)
{
    if (kind == PCN_SESS_LB_HAIRPIN_REV || peer == PCN_SESS_LB_HAIRPIN_REV)
        return kind + peer == PCN_SESS_LB + PCN_SESS_LB_HAIRPIN_REV;
    return peer == (kind & 1 ? kind + 1 : kind - 1);
}

static __always_inline int pcn_session_is_reply(u8 kind)
{
    return !(kind & 1) || kind == PCN_SESS_LB_HAIRPIN_REV;
}

/* 1 when `peer` (found at `pk`, the peer key of `k`'s entry `x`) is the
 * other half of the same connection, not an entry of a later one. */
static __always_inline int pcn_session_paired(const struct pcn_flow *k, const struct pcn_xlate *x,
                                              const struct pcn_flow *pk,
                                              const struct pcn_xlate *peer)
{
    if (!peer || !pcn_session_kinds_pair(x->kind, peer->kind))
        return 0;
    struct pcn_flow back = {};
    pcn_session_peer_key(pk, peer, &back);
    return back.saddr == k->saddr && back.daddr == k->daddr && back.sport == k->sport &&
           back.dport == k->dport;
}

/* How a connection stands: its younger direction decides (one-way traffic
 * keeps both entries). `peer` is the entry at the peer key, or NULL. */
static __always_inline int pcn_session_pair_age(const struct pcn_session_cfg *cfg,
                                                const struct pcn_flow *k,
                                                const struct pcn_xlate *x,
                                                const struct pcn_flow *pk,
                                                const struct pcn_xlate *peer, u64 now)
{
    int age = pcn_session_age(cfg, k->proto, x, now);
    if (age == PCN_AGE_LIVE || !pcn_session_paired(k, x, pk, peer))
        return age;
    int other = pcn_session_age(cfg, k->proto, peer, now);
    return other < age ? other : age;
}

/* A packet that opens a new connection on the ports of one that is over: a
 * SYN after both sides closed or one reset, as conntrack reopens TIME_WAIT
 * and CLOSE (tcp_conntracks, sTW/sCL + SYN -> sSS). */
static __always_inline int pcn_session_reopens(u8 proto, const struct pcn_xlate *x, u8 flags)
{
    return proto == IPPROTO_TCP && !pcn_session_is_reply(x->kind) &&
           (flags & (PCN_TCP_SYN | PCN_TCP_ACK | PCN_TCP_RST)) == PCN_TCP_SYN &&
           (x->state == PCN_CT_TIME_WAIT || x->state == PCN_CT_CLOSE);
}

/* A connection whose port a new one may take before its lifetime is over,
 * when no other port is left: both sides closed (and the last FIN was
 * acknowledged: no packet of it is still due), or reset, and the new packet
 * opens a TCP connection. Linux's NAT does the same in its last
 * attempts (nf_nat_used_tuple_harder, Linux 6.5, which also checks that the
 * new sequence number is past the old one: we keep none; a peer still in
 * TIME_WAIT then answers the new SYN with an ACK, the client resets it and
 * its retransmitted SYN gets through, RFC 1337). */
static __always_inline int pcn_session_evictable(u8 proto, const struct pcn_xlate *x,
                                                 u8 new_flags)
{
    return proto == IPPROTO_TCP &&
           (new_flags & (PCN_TCP_SYN | PCN_TCP_ACK | PCN_TCP_RST)) == PCN_TCP_SYN &&
           (x->state == PCN_CT_TIME_WAIT || x->state == PCN_CT_CLOSE);
}

static __always_inline u32 pcn_now_ms(u64 now)
{
    return (u32)(now / 1000000);
}

/* The state after a packet with TCP `flags` (0 for UDP and ICMP), in the
 * opening direction or a `reply`, `age_ms` after the connection began. */
static __always_inline u8 pcn_session_next(u8 proto, u8 state, u8 flags, int reply, u32 age_ms)
{
    if (proto == IPPROTO_TCP) {
        if (flags & PCN_TCP_RST)
            return PCN_CT_CLOSE;
        if (state == PCN_CT_CLOSE || state == PCN_CT_TIME_WAIT)
            return state;
        if (state == PCN_CT_LAST_ACK) /* after the last FIN, the other side's ACK */
            return (flags & (PCN_TCP_ACK | PCN_TCP_FIN | PCN_TCP_SYN)) == PCN_TCP_ACK
                       ? PCN_CT_TIME_WAIT : state;
        if (flags & PCN_TCP_FIN) {
            if (reply)
                return state == PCN_CT_FIN_WAIT ? PCN_CT_LAST_ACK : PCN_CT_CLOSE_WAIT;
            return state == PCN_CT_CLOSE_WAIT ? PCN_CT_LAST_ACK : PCN_CT_FIN_WAIT;
        }
        if (state == PCN_CT_SYN_SENT && reply) /* answered; or a connection picked up mid-way */
            return flags & PCN_TCP_SYN ? PCN_CT_SYN_RECV : PCN_CT_ESTABLISHED;
        if (state == PCN_CT_SYN_RECV && !reply && (flags & PCN_TCP_ACK) && !(flags & PCN_TCP_SYN))
            return PCN_CT_ESTABLISHED;
        return state;
    }
    if (state == PCN_CT_UNREPLIED && reply)
        state = PCN_CT_REPLIED;
    if (proto == IPPROTO_UDP && state == PCN_CT_REPLIED && age_ms >= PCN_CT_UDP_STREAM_AFTER_MS)
        state = PCN_CT_STREAM;
    return state;
}

/* The state of a new connection opened by a packet with TCP `flags`. */
static __always_inline u8 pcn_session_first(u8 proto, u8 flags)
{
    return pcn_session_next(proto, PCN_CT_SYN_SENT, flags, 0, 0);
}

/* Record that `x` saw a packet: at most every second (sessions are read on
 * every packet), more often for lifetimes under 8 s. */
static __always_inline void pcn_session_touch(const struct pcn_session_cfg *cfg, u8 proto,
                                              struct pcn_xlate *x, u64 now)
{
    u64 every = pcn_session_lifetime(cfg, proto, x->state) >> 3;
    if (every > PCN_SESSION_REFRESH_NS)
        every = PCN_SESSION_REFRESH_NS;
    if (pcn_since(x->seen_ns, now) > (s64)every)
        x->seen_ns = now;
}

/* Take over an entry past its lifetime but within the grace for a new
 * connection: one CPU wins (the compare-and-swap on seen_ns), and the
 * collector never deletes such an entry. 1 when `x` is now the caller's. */
static __always_inline int pcn_session_claim(struct pcn_xlate *x, u64 seen, u64 now)
{
    return __sync_val_compare_and_swap(&x->seen_ns, seen, now) == seen;
}

/* Choosing a masquerading port (k8sdispatcher's disp_alloc_port, the lbrp's
 * lbrp_masq_port): PCN_PORT_TRIES ports of the range, from the flow's hash a
 * prime step apart, then PCN_PORT_HARDER more that may also take a closed
 * connection's port, as Linux's NAT makes its last attempts harder
 * (nf_nat_used_tuple_harder). The harder tries are ports not tried before
 * (a range smaller than the tries is gone through again): a connection
 * still open, or one past the grace that the collector has yet to remove,
 * on one of the first ports must not make them fail. Each try costs the
 * verifier its body again, hence so few (Linux makes up to 128). */
#define PCN_PORT_TRIES 16
#define PCN_PORT_HARDER 4

/* The port (network order) of try `n` in [lo, lo + range). A step coprime
 * with the range visits every port of it before any again: a prime, and
 * another for the ranges that are multiples of the first. */
static __always_inline __be16 pcn_port_try(u32 hash, u32 n, u16 lo, u32 range)
{
    u32 step = range % 7919 ? 7919 : 7907;
    /* hash % range first: hash + n * step would wrap past 2**32 for a hash
     * near the top, shifting the later tries onto ports already tried */
    return bpf_htons(lo + (hash % range + n * step) % range);
}

#define PCN_TAKE_NO 0
#define PCN_TAKE 1           /* the entry's connection had only this half left */
#define PCN_TAKE_WITH_PEER 2 /* and its other half goes too */

/* Whether a new connection (its first packet's TCP `flags`) may take the
 * port of the reverse entry `old` at `rev` (`peer`: the entry at its peer
 * key `pk`, or NULL): when its connection is over, past its lifetime
 * (within the grace: later, the entry is the collector's), as conntrack
 * frees the tuple of an expired connection; or, on a `harder` try, closed
 * (pcn_session_evictable). The caller claims it (pcn_session_claim with the
 * seen_ns it read before looking the peer up) and writes it. */
static __always_inline int pcn_session_takeable(const struct pcn_session_cfg *cfg,
                                                const struct pcn_flow *rev,
                                                const struct pcn_xlate *old,
                                                const struct pcn_flow *pk,
                                                const struct pcn_xlate *peer, u64 now, u8 flags,
                                                int harder)
{
    int age = pcn_session_pair_age(cfg, rev, old, pk, peer, now);
    if (age == PCN_AGE_DEAD ||
        (age == PCN_AGE_LIVE && !(harder && pcn_session_evictable(rev->proto, old, flags))))
        return PCN_TAKE_NO;
    return pcn_session_paired(rev, old, pk, peer) &&
                   pcn_session_age(cfg, rev->proto, peer, now) != PCN_AGE_DEAD
               ? PCN_TAKE_WITH_PEER
               : PCN_TAKE;
}

#endif
