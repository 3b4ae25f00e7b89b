/* Sessions: per-connection translation state, kept in pinned LRU tables so a
 * restarted agent finds every established connection where it left it.
 * Keyed by the flow exactly as it appears on the wire in one direction. */
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
    u16 pad;
    u32 svc;      /* service id for load-balanced sessions */
    u32 pad2;
    u64 seen_ns;
};

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

#define PCN_SESSION_REFRESH_NS 1000000000ULL

static __always_inline void pcn_session_touch(struct pcn_xlate *x, u64 now)
{
    /* Write at most once a second: sessions are read on every packet. */
    if (now - x->seen_ns > PCN_SESSION_REFRESH_NS)
        x->seen_ns = now;
}

#endif
