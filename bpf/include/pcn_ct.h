/* Connection tracking for stateful filters (the policy cube): one entry per
 * connection, found from a packet of either direction, that remembers who
 * accepted the connection and when it was last judged.
 *
 * Unlike the translation sessions of pcn_session.h (one entry per direction,
 * keyed by the flow as it appears on the wire), a filter rewrites nothing, so
 * both directions share one key: the two ends of the 5-tuple in a canonical
 * order (the lower (address, port) first), with a `scope` saying whose entry
 * it is (the policy cube: the pod's port, as a pod's connections to another
 * pod on the node are judged once at each end, by each pod's policy). The
 * entry records which end opened the connection, so that it can be judged
 * again as it was opened.
 *
 * Lifetimes follow Linux conntrack's order of magnitude without its state
 * machine: an established TCP connection lives long (kube-proxy's 24 h for
 * --conntrack-tcp-timeout-established), one not yet answered or closing
 * (a FIN seen) 2 minutes (conntrack's SYN_SENT and TIME_WAIT), a reset one
 * 10 s (CLOSE); everything else a minute after its last packet (UDP
 * streams, ICMP echo, SCTP heartbeats every 30 s by default, RFC 4960
 * §8.3). An LRU map evicts the rest; an entry past its lifetime counts as
 * absent, so no collector is needed. */
#ifndef PCN_CT_H
#define PCN_CT_H

#include "pcn_helpers.h"
#include "pcn_parse.h"

struct pcn_ct_key {
    u32 scope;     /* whose entry (the policy cube: the pod's port id) */
    __be32 addr_a; /* the lower end */
    __be32 addr_b;
    __be16 port_a; /* network order; an ICMP query's identifier on both ends */
    __be16 port_b;
    u8 proto;
    u8 pad[3];
};

/* pcn_ct.flags */
#define PCN_CTF_ORIG_A 0x01    /* end a opened the connection */
#define PCN_CTF_REPLIED 0x02   /* the other end sent something */
#define PCN_CTF_FIN_ORIG 0x04  /* TCP FIN from the opener */
#define PCN_CTF_FIN_REPLY 0x08 /* TCP FIN from the other end */
#define PCN_CTF_RST 0x10       /* TCP RST from either */
/* A later judgement disallowed it. Kept rather than deleted, so that its
 * packets keep being dropped: deleted, the next one would be judged anew,
 * and a TCP packet that starts nothing may be picked up as the reply of a
 * connection opened the other way, which the other direction may allow. */
#define PCN_CTF_REVOKED 0x20

struct pcn_ct {
    u64 seen_ns; /* last packet (refreshed at most every PCN_CT_REFRESH_NS) */
    u32 epoch;   /* the filter's configuration epoch it was judged under */
    u32 ref;     /* who accepted it (the policy cube: the rule's counter id) */
    u8 flags;    /* PCN_CTF_* */
    u8 dir;      /* the filter's direction it was accepted in (policy: POL_INGRESS/EGRESS) */
    u8 pad[6];
};

#define PCN_CT_S 1000000000ULL
#define PCN_CT_REFRESH_NS PCN_CT_S
#define PCN_CT_TCP_ESTABLISHED_NS (86400ULL * PCN_CT_S)
#define PCN_CT_TCP_OPENING_NS (120ULL * PCN_CT_S) /* no answer yet, or closing */
#define PCN_CT_TCP_RESET_NS (10ULL * PCN_CT_S)
/* A revoked connection's ends retransmit with backoff for up to ~15 min
 * (tcp_retries2 = 15): its entry outlives them, or a late retransmission
 * would find none and could be picked up as a reply. */
#define PCN_CT_REVOKED_NS (1200ULL * PCN_CT_S)
#define PCN_CT_OTHER_NS (60ULL * PCN_CT_S)

/* The key of `f`'s connection; 1 when `f`'s source is end a. Two ends with
 * the same address and port (a packet to itself) make the source end a. */
static __always_inline int pcn_ct_key_of(u32 scope, const struct pcn_flow *f,
                                         struct pcn_ct_key *k)
{
    /* any total order does, as long as both directions agree: compare the
     * network-order words as they are */
    int src_is_a = f->saddr < f->daddr || (f->saddr == f->daddr && f->sport <= f->dport);
    k->scope = scope;
    k->addr_a = src_is_a ? f->saddr : f->daddr;
    k->addr_b = src_is_a ? f->daddr : f->saddr;
    k->port_a = src_is_a ? f->sport : f->dport;
    k->port_b = src_is_a ? f->dport : f->sport;
    k->proto = f->proto;
    k->pad[0] = k->pad[1] = k->pad[2] = 0;
    return src_is_a;
}

static __always_inline u64 pcn_ct_lifetime(u8 proto, u8 flags)
{
    if (proto != IPPROTO_TCP)
        return PCN_CT_OTHER_NS;
    if (flags & PCN_CTF_RST)
        return PCN_CT_TCP_RESET_NS;
    if (flags & PCN_CTF_REVOKED)
        return PCN_CT_REVOKED_NS;
    if ((flags & (PCN_CTF_FIN_ORIG | PCN_CTF_FIN_REPLY)) || !(flags & PCN_CTF_REPLIED))
        return PCN_CT_TCP_OPENING_NS;
    return PCN_CT_TCP_ESTABLISHED_NS;
}

/* Whether the entry still stands at `now` (signed: another CPU may have
 * written a later `seen_ns` than our `now`). */
static __always_inline int pcn_ct_live(const struct pcn_ct *c, u8 proto, u64 now)
{
    return (s64)(now - c->seen_ns) <= (s64)pcn_ct_lifetime(proto, c->flags);
}

/* A TCP connection that is over (reset, or a FIN seen): a new SYN on its
 * ports opens a new one, as conntrack reopens CLOSE and TIME_WAIT. */
static __always_inline int pcn_ct_closed(const struct pcn_ct *c)
{
    return c->flags & (PCN_CTF_RST | PCN_CTF_FIN_ORIG | PCN_CTF_FIN_REPLY);
}

/* Whether a packet whose source is end a (`src_is_a`) comes from the opener. */
static __always_inline int pcn_ct_from_orig(const struct pcn_ct *c, int src_is_a)
{
    return !!(c->flags & PCN_CTF_ORIG_A) == !!src_is_a;
}

/* The flags after a packet with TCP `tcp_flags` (0 for other protocols). */
static __always_inline u8 pcn_ct_next_flags(u8 flags, int from_orig, u8 tcp_flags)
{
    if (!from_orig)
        flags |= PCN_CTF_REPLIED;
    if (tcp_flags & PCN_TCP_RST)
        flags |= PCN_CTF_RST;
    if (tcp_flags & PCN_TCP_FIN)
        flags |= from_orig ? PCN_CTF_FIN_ORIG : PCN_CTF_FIN_REPLY;
    return flags;
}

/* Record a packet of the connection: its flags at once, the time at most
 * every PCN_CT_REFRESH_NS (entries are read on every packet; writing each
 * time would bounce the cache line between CPUs). */
static __always_inline void pcn_ct_observe(struct pcn_ct *c, int from_orig, u8 tcp_flags,
                                           u64 now)
{
    u8 flags = pcn_ct_next_flags(c->flags, from_orig, tcp_flags);
    if (flags != c->flags) {
        c->flags = flags;
        c->seen_ns = now;
    } else if ((s64)(now - c->seen_ns) > (s64)PCN_CT_REFRESH_NS) {
        c->seen_ns = now;
    }
}

#endif
