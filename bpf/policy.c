/* policy: Kubernetes network policy (NetworkPolicy, ClusterNetworkPolicy) as
 * the control plane compiled it (pcn_agent.dataplane.policyrules, whose
 * docstring is the evaluation order this file implements). A transparent
 * cube: one instance per node, stacked on both hooks of every pod's port,
 * with all its state keyed by the pod's port id:
 *  - on the ingress hook (what the pod sends) it enforces the pod's egress
 *    policy, the peer being the destination; it runs after the lbrp, so a
 *    Service's virtual address is already the backend's;
 *  - on the egress hook (what the pod receives) it enforces the pod's
 *    ingress policy, the peer being the source; it runs before the lbrp
 *    translates replies back, so they still carry the backend's address.
 *
 * Only the first packet of a connection is judged: an accepted one creates a
 * connection tracking entry (pcn_ct.h) through which its later packets and
 * replies pass with one lookup, counted for the rule that accepted it, as do
 * ICMP errors quoting it. Every policy change bumps a global epoch; an entry
 * judged under an older one is judged again on its next packet, so a
 * connection that a change disallows stops at once (kube-network-policies
 * and Cilium do the same by flushing conntrack or re-checking policy on
 * established flows); its entry stays, revoked, dropping its packets until
 * they stop (PCN_CTF_REVOKED).
 *
 * A pod whose policy the agent never wrote (no pol_cfgs entry) is not
 * touched at all; one with a policy has every packet tracked, also in a
 * direction no rule restricts, so that replies to what it may send pass the
 * other direction's checks.
 *
 * Rules are written under a new generation and switched to by one update of
 * the pod's config, as the firewall does; peers are address sets (an LPM
 * trie per set id), so a label change is a set update that touches no rule. */
#include "pcn_chain.h"
#include "pcn_parse.h"
#include "pcn_frag.h"
#include "pcn_icmperr.h"
#include "pcn_ct.h"

/* The loop bound: rules per pod and direction, every tier together
 * (policy.MAX_RULES in Python). The verifier walks the loop once per round
 * and its work grows faster than the bound: policy_judge with 64 rounds
 * verifies in about 270k instructions of the million it allows, 128 in
 * about 930k. */
#define POL_MAX_RULES 64
#define POL_PORTS 8 /* policyrules.PORTS_PER_RULE */

#define POL_ACCEPT 0 /* policyrules.Action */
#define POL_DENY 1
#define POL_PASS 2

#define POL_TIER_ADMIN 0
#define POL_TIER_NAMESPACED 1
#define POL_TIER_BASELINE 2

#define POL_INGRESS 0 /* policyrules.Direction: traffic to the pod */
#define POL_EGRESS 1  /* traffic from the pod */

/* Counter ids of a port below the rules' (the Python side allocates those
 * from POL_CTR_FIRST_RULE on, one per RuleRef). */
#define POL_CTR_DEFAULT 0   /* + direction: accepted as nothing decided */
#define POL_CTR_HOST 2      /* from the node's own addresses */
#define POL_CTR_UNNAMED 3   /* rules without a RuleRef */
#define POL_CTR_ISOLATION 4 /* + direction: the namespaced tier's implicit deny */
#define POL_CTR_DROPS 6     /* + direction: every packet dropped by policy */
#define POL_CTR_FIRST_RULE 8
/* Or-ed into a counter id: the packets that crossed the other hook, the
 * replies of the connections the counter's rule (or default) accepted or
 * dropped. Kept apart so that a rule's own count is the traffic of its own
 * direction and a user reading an ingress rule's row does not find the
 * pod's answers added to it. Bit 15: pcn_frag.h records a counter id in 16
 * bits, and the Python side allocates ids far below it (policy.py). */
#define POL_CTR_REPLY 0x8000

/* pcn_frag.h owners are cube ids elsewhere (below PCN_MAX_CUBES); the
 * policy's are per port and direction, as one datagram crosses two pods'
 * policies (the sender's egress, the receiver's ingress) on one node. */
#define POL_FRAG_OWNER 0x80000000

/* The counts say where each tier's rules are, for whoever reads the maps
 * back (explain, kubectl pcn); the program itself goes by each rule's
 * `tier` (see pol_judge). */
struct pol_tier {
    u16 n_admin; /* rules 0..n_admin-1 of the direction */
    u16 n_namespaced;
    u16 n_baseline;
    u8 isolated;
    u8 pad;
};

struct pol_cfg {
    u32 gen;
    u32 pad;
    struct pol_tier dir[2]; /* by POL_INGRESS / POL_EGRESS */
};

struct pol_rule_key {
    u32 port;
    u32 gen;
    u16 idx; /* admin, then namespaced, then baseline rules */
    u8 dir;
    u8 pad;
};

struct pol_portmatch {
    u16 lo; /* host order, inclusive */
    u16 hi;
    u8 proto; /* 0: any packet, whatever its protocol */
    u8 pad;
};

struct pol_rule {
    u32 set;     /* address set id of the peers */
    u32 counter; /* counter id */
    u8 action;   /* POL_ACCEPT/DENY/PASS */
    u8 n_ports;  /* 0: any packet */
    u8 named_port; /* the port is the one the peer's set entry gives */
    u8 tier;     /* POL_TIER_*: rules are in tier order */
    struct pol_portmatch ports[POL_PORTS];
};

struct pol_set_key {
    u32 prefixlen; /* 32 (the set) + the prefix length */
    u32 set;
    __be32 ip;
};

struct pol_set_val {
    u8 proto; /* a named port's protocol and port (host order), else 0 */
    u8 pad;
    u16 port;
};

struct pol_host_key {
    u32 prefixlen;
    __be32 ip;
};

struct pol_ctr_key {
    u32 port;
    u32 id;
};

struct pol_ctr {
    u64 packets;
    u64 bytes;
};

BPF_TABLE_PINNED("hash", u32, struct pol_cfg, pol_cfgs, PCN_MAX_PORTS, PCN_PIN("pol_cfgs"));
BPF_TABLE_PINNED("hash", struct pol_rule_key, struct pol_rule, pol_rules, 65536,
                 PCN_PIN("pol_rules"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct pol_set_key, struct pol_set_val, pol_sets, 262144,
                 PCN_PIN("pol_sets"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct pol_host_key, u32, pol_host, 256, PCN_PIN("pol_host"),
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct pcn_ct_key, struct pcn_ct, pol_ct, 262144,
                 PCN_PIN("pol_ct"));
BPF_TABLE_PINNED("percpu_hash", struct pol_ctr_key, struct pol_ctr, pol_ctrs, 65536,
                 PCN_PIN("pol_ctrs"));
BPF_TABLE_PINNED("array", u32, u32, pol_epoch, 1, PCN_PIN("pol_epoch"));
/* policy_judge, in slot 0 (written by the agent after it loads the type). */
BPF_TABLE_PINNED("prog", u32, u32, pol_progs, 1, PCN_PIN("pol_progs"));

/* What one evaluation asks: may `peer` talk to the pod in direction `dir`
 * on destination port `dport` (host order, 0 for protocols without ports)? */
struct pol_query {
    __be32 peer;
    u16 dport;
    u8 dir;
    u8 pad;
};

/* What policy_rx hands policy_judge: everything the judgement and its
 * bookkeeping need, so that the judging program starts from one simple
 * state. Per CPU, and valid only across the tail call: a tc program runs
 * to its end (tail calls included) on one CPU without another packet's
 * program in between. */
struct pol_scratch {
    struct pol_query q[2];  /* as the packet goes; as the reply of one opened the other way */
    struct pol_tier tier[2]; /* of q[0] and q[1] */
    struct pcn_ct_key k;
    struct pcn_flow f;      /* for a first fragment's record */
    u64 now;
    u32 gen;
    u32 epoch;
    u32 owner;              /* its pcn_frag.h owner */
    __be16 ip_id;
    u8 nq;                  /* queries to try, in order, until one accepts */
    u8 rejudge;             /* 1: `k` is tracked, judged under an older epoch */
    u8 src_is_a;
    u8 dir;                 /* of this packet */
    u8 tflags;
    u8 proto;
    u8 icmp_type;
    u8 icmp_error;          /* judged, never tracked */
    u8 first_fragment;
    u8 skip_admin;          /* policy_judge's: an admin PASS matched */
    u8 qi;                  /* the query policy_judge evaluates in this run */
};

/* Pinned like every map of the bundle's programs: a restarted agent takes
 * over a program only when all of its maps are the new module's too. */
BPF_TABLE_PINNED("percpu_array", u32, struct pol_scratch, pol_scratch, 1,
                 PCN_PIN("pol_scratch"));

static __always_inline int pol_has_ports(u8 proto)
{
    return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* POL_CTR_REPLY when a packet crossing the hook of direction `dir` goes the
 * other way than the connection `opened` in (a policy direction), else 0;
 * arithmetic, not a branch, for the rule loop's program. */
static __always_inline u32 pol_reply_bit(u32 opened, u32 dir)
{
    return ((opened ^ dir) & 1) << 15;
}

static __always_inline void pol_count(u32 port, u32 id, u32 bytes)
{
    struct pol_ctr_key k = {.port = port, .id = id};
    struct pol_ctr *c = pol_ctrs.lookup(&k);
    if (c) {
        c->packets++;
        c->bytes += bytes;
    }
}

/* Comparisons as arithmetic on values below 2^16: BPF has no conditional
 * set or move, so every `==` or `<=` clang keeps is a branch, and every
 * branch in the rule loop multiplies the paths the verifier walks. The
 * empty asm hides the operands' known bits from clang, which would
 * otherwise turn the arithmetic back into comparisons. */
static __always_inline u64 pol_eq(u64 a, u64 b)
{
    u64 d = a ^ b;
    asm volatile("" : "+r"(d));
    return (d - 1) >> 63;
}

static __always_inline u64 pol_le(u64 a, u64 b) /* a <= b */
{
    u64 d = b - a;
    asm volatile("" : "+r"(d));
    return (d >> 63) ^ 1;
}

/* Whether rule `r` matches the query: the peer is in its set, and the packet
 * is on one of its ports (any packet with none; the port the peer's set
 * entry names for a named-port rule). `ports`: the protocol has ports. */
static __always_inline int pol_rule_matches(const struct pol_rule *r, const struct pol_query *q,
                                            u64 proto, u64 ports)
{
    struct pol_set_key sk = {.prefixlen = 64, .set = r->set, .ip = q->peer};
    struct pol_set_val *e = pol_sets.lookup(&sk);
    if (!e)
        return 0;
    u64 dport = q->dport;
    u64 n = r->n_ports;
    u64 named = r->named_port & 1;
    u64 by_name = ports & pol_eq(e->proto, proto) & pol_eq(e->port, dport);
    u64 hit = pol_eq(n, 0);
#pragma unroll
    for (u32 j = 0; j < POL_PORTS; j++) {
        const struct pol_portmatch *m = &r->ports[j];
        u64 in_range = ports & pol_eq(m->proto, proto) & pol_le(m->lo, dport) &
                       pol_le(dport, m->hi);
        hit |= pol_le(j + 1, n) & (pol_eq(m->proto, 0) | in_range);
    }
    return ((named & by_name) | ((named ^ 1) & hit)) != 0;
}

/* The tiers in order (policyrules): admin first match (PASS skips the rest
 * of the tier), namespaced any match accepts and isolation denies what none
 * matched, baseline first match (PASS ends it: the next tier is the
 * default), then accept. Returns POL_ACCEPT or POL_DENY; `*ctr` is the
 * counter of whatever decided. The node's own addresses reach the pod
 * whatever the rules say (kubelet probes: upstream's "traffic from the
 * node is allowed", which every NetworkPolicy implementation grants).
 *
 * The loop learns where a tier ends from each rule's own `tier`, and ends
 * at the first index with no rule, rather than comparing the index with
 * the config's counts: such comparisons teach the verifier ranges of the
 * counts that differ from one way through the loop to the next, so that it
 * could merge none of them and walked 2^rules paths. */
static __always_inline u32 pol_judge(u32 port, struct pol_scratch *s, u32 qi, u32 *ctr)
{
    const struct pol_query *q = &s->q[qi & 1];
    u32 dir = q->dir & 1;
    if (dir == POL_INGRESS) {
        struct pol_host_key hk = {.prefixlen = 32, .ip = q->peer};
        if (pol_host.lookup(&hk)) {
            *ctr = POL_CTR_HOST;
            return POL_ACCEPT;
        }
    }
    u64 proto = s->proto;
    u64 ports = pol_has_ports(proto);
    u32 gen = s->gen;
    s->skip_admin = 0;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < POL_MAX_RULES; i++) {
        struct pol_rule_key k = {.port = port, .gen = gen, .idx = i, .dir = dir};
        struct pol_rule *r = pol_rules.lookup(&k);
        if (!r)
            break;
        /* read back from the map on every round: what the verifier knows
         * of a map value does not differ from one round to the next */
        u64 isolated = s->tier[qi & 1].isolated != 0;
        u64 skip = s->skip_admin;
        u64 tier = r->tier;
        u64 admin = pol_eq(tier, POL_TIER_ADMIN);
        if (pol_eq(tier, POL_TIER_BASELINE) & isolated)
            break; /* no namespaced rule matched: isolation decides, baseline is not reached */
        if ((admin & skip) || !pol_rule_matches(r, q, proto, ports))
            continue;
        u32 action = r->action;
        if (admin & pol_eq(action, POL_PASS)) {
            s->skip_admin = 1;
            continue;
        }
        *ctr = r->counter;
        if (tier == POL_TIER_NAMESPACED)
            return POL_ACCEPT;
        return action == POL_DENY ? POL_DENY : POL_ACCEPT;
    }
    if (s->tier[qi & 1].isolated) {
        *ctr = POL_CTR_ISOLATION + dir;
        return POL_DENY;
    }
    *ctr = POL_CTR_DEFAULT + dir;
    return POL_ACCEPT;
}

static __always_inline u32 pol_epoch_now(void)
{
    u32 zero = 0;
    u32 *e = pol_epoch.lookup(&zero);
    return e ? *e : 0;
}

/* The end of every packet's way through the cube: the fragments that follow
 * a first one get its verdict, the deciding counter and the direction's
 * drops are counted, and the packet goes on or is dropped. */
static __always_inline int pol_finish(struct __sk_buff *skb, u32 port, u32 dir, u32 verdict,
                                      u32 ctr)
{
    pol_count(port, ctr, skb->len);
    if (verdict != POL_ACCEPT) {
        pol_count(port, POL_CTR_DROPS + (dir & 1), skb->len);
        return pcn_filter_drop(skb, PCN_DROP_POLICY);
    }
    return pcn_pass(skb);
}

/* The fast path: tracked connections, their replies and related ICMP
 * errors, and fragments after their first. Anything to judge goes to
 * policy_judge: the rule loop is verified there once, not once per way
 * through this program. */
int policy_rx(struct __sk_buff *skb)
{
    u32 port = pcn_meta_port(skb);
    struct pol_cfg *cfg = pol_cfgs.lookup(&port);
    if (!cfg)
        return pcn_pass(skb);
    /* the port's ingress hook sees what the pod sends: its egress policy */
    u32 dir = pcn_meta_hook(skb) == PCN_HOOK_INGRESS ? POL_EGRESS : POL_INGRESS;

    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return pcn_pass(skb);
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return pcn_pass(skb); /* policies are IPv4; ARP must flow for IPv4 to work */
    struct pcn_flow f = {};
    struct pcn_l4info info = {};
    int parsed = pcn_parse_flow(skb, &f, &info);
    if (parsed == PCN_PARSE_NOT_IPV4)
        return pcn_filter_drop(skb, PCN_DROP_PARSE);
    if (parsed == PCN_PARSE_SHORT) /* no ports to judge by; a tiny first fragment: RFC 1858 */
        return pcn_filter_drop(skb, info.first_fragment ? PCN_DROP_FRAGMENT : PCN_DROP_PARSE);

    u64 now = bpf_ktime_get_ns();
    u32 owner = POL_FRAG_OWNER | (port << 1) | dir;
    if (info.is_fragment) { /* the datagram's first fragment was judged for it */
        struct pcn_frag_val *v = pcn_frag_overlaps(&f, &info)
                                     ? NULL
                                     : pcn_frag_lookup(owner, &f, &info, now);
        if (!v)
            return pcn_filter_drop(skb, PCN_DROP_FRAGMENT);
        return pol_finish(skb, port, dir, v->verdict, v->rule);
    }

    int ports = pol_has_ports(f.proto);
    u16 sport = ports ? bpf_ntohs(f.sport) : 0;
    u16 dport = ports ? bpf_ntohs(f.dport) : 0;
    u8 tflags = f.proto == IPPROTO_TCP ? info.tcp_flags : 0;
    int tcp_start = f.proto == IPPROTO_TCP &&
                    (tflags & (PCN_TCP_SYN | PCN_TCP_ACK | PCN_TCP_RST)) == PCN_TCP_SYN;
    u32 epoch = pol_epoch_now();

    struct pcn_ct_key k = {};
    int src_is_a = pcn_ct_key_of(port, &f, &k);
    struct pcn_ct *c = pol_ct.lookup(&k);
    /* Over, or a SYN from the end that did not open it (an entry picked up
     * mid-stream names the other end its opener: a segment that starts
     * nothing, sent first, must not open the way for a connection this
     * direction's policy denies): this packet starts anew, and its entry,
     * if it is accepted, replaces that one. */
    if (c && (!pcn_ct_live(c, f.proto, now) ||
              (tcp_start && (pcn_ct_closed(c) || !pcn_ct_from_orig(c, src_is_a)))))
        c = NULL;
    if (c && c->epoch == epoch) {
        pcn_ct_observe(c, pcn_ct_from_orig(c, src_is_a), tflags, now);
        u32 ref = c->ref | pol_reply_bit(c->dir, dir);
        if (c->flags & PCN_CTF_REVOKED) {
            if (info.first_fragment)
                pcn_frag_record(owner, &f, &info, POL_DENY, ref, now);
            return pol_finish(skb, port, dir, POL_DENY, ref);
        }
        if (info.first_fragment)
            pcn_frag_record(owner, &f, &info, POL_ACCEPT, ref, now);
        return pol_finish(skb, port, dir, POL_ACCEPT, ref);
    }

    int icmp_error = f.proto == IPPROTO_ICMP && pcn_icmp_is_error(info.icmp_type);
    if (!c && icmp_error) { /* related: an error about a connection accepted here */
        struct pcn_icmp_quote qt = {};
        if (pcn_icmp_quote_parse(skb, &f, &info, &qt) == 0) {
            struct pcn_ct_key qk = {};
            pcn_ct_key_of(port, &qt.flow, &qk);
            struct pcn_ct *qc = pol_ct.lookup(&qk);
            if (qc && qc->epoch == epoch && !(qc->flags & PCN_CTF_REVOKED) &&
                pcn_ct_live(qc, qt.flow.proto, now)) {
                u32 ref = qc->ref | pol_reply_bit(qc->dir, dir);
                if (info.first_fragment)
                    pcn_frag_record(owner, &f, &info, POL_ACCEPT, ref, now);
                return pol_finish(skb, port, dir, POL_ACCEPT, ref);
            }
        }
    }

    u32 zero = 0;
    struct pol_scratch *s = pol_scratch.lookup(&zero);
    if (!s)
        return pcn_filter_drop(skb, PCN_DROP_POLICY);
    /* A tracked connection from an older epoch is judged as it was opened;
     * a new packet as it is, and a TCP packet that starts nothing (its
     * connection began before the pod was selected, or before this entry)
     * also as the reply of a connection opened the other way. */
    if (c) {
        int orig_a = c->flags & PCN_CTF_ORIG_A;
        u8 odir = c->dir & 1;
        s->q[0].dir = odir;
        s->q[0].peer = odir == POL_EGRESS ? (orig_a ? k.addr_b : k.addr_a)
                                          : (orig_a ? k.addr_a : k.addr_b);
        s->q[0].dport = ports ? bpf_ntohs(orig_a ? k.port_b : k.port_a) : 0;
        s->nq = 1;
    } else {
        s->q[0].dir = dir;
        s->q[0].peer = dir == POL_EGRESS ? f.daddr : f.saddr;
        s->q[0].dport = dport;
        s->nq = f.proto == IPPROTO_TCP && !tcp_start ? 2 : 1;
    }
    s->q[1].dir = dir ^ 1;
    s->q[1].peer = dir == POL_EGRESS ? f.daddr : f.saddr;
    s->q[1].dport = sport;
    s->tier[0] = cfg->dir[s->q[0].dir & 1];
    s->tier[1] = cfg->dir[(dir ^ 1) & 1];
    s->k = k;
    s->f = f;
    s->now = now;
    s->gen = cfg->gen;
    s->epoch = epoch;
    s->owner = owner;
    s->ip_id = info.ip_id;
    s->rejudge = c != NULL;
    s->src_is_a = src_is_a;
    s->dir = dir;
    s->tflags = tflags;
    s->proto = f.proto;
    s->icmp_type = info.icmp_type;
    s->icmp_error = icmp_error;
    s->first_fragment = info.first_fragment;
    s->qi = 0;
    pol_progs.call(skb, 0);
    return pcn_filter_drop(skb, PCN_DROP_TAIL_CALL);
}

/* The slow path: one judgement (a second, in a second run, for a TCP
 * packet picked up mid-way), then the connection's entry is made, renewed
 * or removed. */
int policy_judge(struct __sk_buff *skb)
{
    u32 port = pcn_meta_port(skb);
    u32 zero = 0;
    struct pol_scratch *s = pol_scratch.lookup(&zero);
    if (!s)
        return pcn_filter_drop(skb, PCN_DROP_POLICY);
    u32 t = s->qi & 1;
    u32 ctr = POL_CTR_DROPS;
    u32 verdict = pol_judge(port, s, t, &ctr);
    if (verdict != POL_ACCEPT && !t && s->nq > 1) {
        /* the reply evaluation: a run of its own, as one run with both
         * would have the verifier walk the second loop once per way out
         * of the first */
        s->qi = 1;
        pol_progs.call(skb, 0);
        return pcn_filter_drop(skb, PCN_DROP_TAIL_CALL);
    }
    u32 dir = s->dir & 1;
    struct pcn_ct_key k = s->k;
    u64 now = s->now;
    u8 tflags = s->tflags;
    if (s->rejudge) {
        struct pcn_ct *c = pol_ct.lookup(&k);
        if (c) { /* still allowed: the flow goes on untouched; else revoked */
            c->epoch = s->epoch;
            c->ref = ctr;
            if (verdict == POL_ACCEPT)
                c->flags &= ~PCN_CTF_REVOKED;
            else
                c->flags |= PCN_CTF_REVOKED;
            pcn_ct_observe(c, pcn_ct_from_orig(c, s->src_is_a), tflags, now);
        }
    } else if (verdict == POL_ACCEPT && !s->icmp_error) {
        /* t 1: accepted as a reply, the other end opened it */
        int opener_is_a = t ? !s->src_is_a : s->src_is_a;
        struct pcn_ct n = {.seen_ns = now, .epoch = s->epoch, .ref = ctr,
                           .dir = t ? dir ^ 1 : dir};
        n.flags = pcn_ct_next_flags(opener_is_a ? PCN_CTF_ORIG_A : 0, !t, tflags);
        pol_ct.update(&k, &n);
    }
    /* the evaluation that decided asked about its own direction's policy */
    u32 counted = ctr | pol_reply_bit(s->q[t].dir, dir);
    if (s->first_fragment) { /* the later fragments get the same verdict */
        struct pcn_flow f = s->f;
        struct pcn_l4info info = {.ip_id = s->ip_id, .icmp_type = s->icmp_type};
        pcn_frag_record(s->owner, &f, &info, verdict, counted, now);
    }
    return pol_finish(skb, port, dir, verdict, counted);
}
