/* packetcapture: a transparent cube that copies the frames matching its
 * filter to user space through a BPF ring buffer, and lets every frame pass
 * unchanged.
 *
 * Each copy carries the hook it was seen on (the port's ingress hook: what
 * the pod sends; its egress hook: what the pod receives), the port, the
 * frame's length on the wire and at most `snaplen` bytes of it. A per-second
 * budget bounds what one capture costs the node.
 *
 * Its counters are an exact partition of what it matched: every frame the
 * filter accepts counts as matched and as exactly one of copied (its record
 * is in the ring buffer), not copied (the second's budget was spent, or the
 * snap length left nothing to copy) and lost (the ring buffer had no room:
 * nobody reading fast enough; or the copy failed), in one run of the
 * program, so that matched == copied + not copied + lost whenever no frame is
 * between the two increments (the agent reads them after the instance stopped
 * matching).
 *
 * One program serves every capture of the agent: an instance's filter
 * (pcn_capfilter.h), snap length, budget and port are map entries keyed by
 * its id. Nothing here is pinned: a capture lives as long as the agent
 * process that reads it. */
#include "pcn_chain.h"
#include "pcn_capfilter.h"
#include "pcn_ratebudget.h"

#ifndef CAP_SNAP_MAX
#define CAP_SNAP_MAX 8192 /* pcn_agent.dataplane.cubes.packetcapture.SNAP_MAX */
#endif
/* 16 MiB with 4 KiB pages: a whole second of the default budget (2000
 * copies) at the largest snap length, so that a reader stalled for up to a
 * second (a busy agent) loses nothing at the default rate; 1 MiB held 126
 * copies of GSO frames and lost most of a burst (issue 12 trial). */
#ifndef CAP_RING_PAGES
#define CAP_RING_PAGES 4096 /* pcn_agent.dataplane.cubes.packetcapture.RING_BYTES */
#endif

/* cap_stats[inst * CAP_STATS + k]: MATCHED == COPIED + NOT_COPIED + LOST */
#define CAP_STAT_MATCHED 0    /* the filter accepted the frame */
#define CAP_STAT_COPIED 1     /* ... and a copy went to the ring buffer */
#define CAP_STAT_NOT_COPIED 2 /* ... but the budget was spent (or nothing to copy) */
#define CAP_STAT_LOST 3       /* ... but the ring buffer was full (or the copy failed) */
#define CAP_STATS 4

struct cap_cfg {
    u32 n_insns;
    u32 snaplen;
    u32 budget; /* copies per second */
    u32 port;   /* only frames of this port match (a reader of a capture point
                 * shared by several pods); 0: every port */
};

struct cap_event {
    u64 ts_ns;    /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u32 inst;
    u32 port;
    u32 wire_len; /* skb->len: the whole frame (a GSO one counts once) */
    u32 cap_len;  /* bytes of it that follow this header */
    u8 hook;      /* PCN_HOOK_INGRESS or PCN_HOOK_EGRESS */
    u8 pad[7];
};

struct cap_scratch {
    struct cap_event ev;
    u8 data[CAP_SNAP_MAX];
};

BPF_HASH(cap_cfgs, u32, struct cap_cfg, PCN_MAX_CUBES);
BPF_ARRAY(cap_prog, struct cap_insn, PCN_MAX_CUBES * CAP_MAX_INSNS);
BPF_ARRAY(cap_budget, struct rate_budget, PCN_MAX_CUBES);
BPF_PERCPU_ARRAY(cap_stats, u64, PCN_MAX_CUBES * CAP_STATS);
BPF_PERCPU_ARRAY(cap_scratch, struct cap_scratch, 1);
BPF_RINGBUF_OUTPUT(cap_events, CAP_RING_PAGES);

static __always_inline void cap_count(u32 inst, u32 what)
{
    u32 k = inst * CAP_STATS + what;
    u64 *c = cap_stats.lookup(&k);
    if (c)
        (*c)++;
}

/* Run the instance's match program: 1 when the frame is to be copied. */
static __always_inline int cap_match(struct __sk_buff *skb, u32 inst, u32 n)
{
    if (n == 0)
        return 1; /* no filter: everything */
    struct cap_fields fl = {};
    capfilter_fields(skb, &fl);
    u32 pc = 0;
#pragma clang loop unroll(disable)
    for (u32 step = 0; step < CAP_MAX_INSNS; step++) {
        if (pc >= n || pc >= CAP_MAX_INSNS)
            return 0; /* a jump past the program: the compiler never makes one */
        u32 k = inst * CAP_MAX_INSNS + pc;
        struct cap_insn *in = cap_prog.lookup(&k);
        if (!in)
            return 0;
        u32 next = capfilter_test(in, &fl) ? in->jt : in->jf;
        if (next == CAP_ACCEPT)
            return 1;
        if (next == CAP_REJECT || next <= pc)
            return 0; /* backward jumps would loop: refused */
        pc = next;
    }
    return 0;
}

/* The frame's outcome after a match: exactly one of the three counters. */
static __always_inline int cap_done(struct __sk_buff *skb, u32 inst, u32 what)
{
    cap_count(inst, what);
    return pcn_pass(skb);
}

int packetcapture_rx(struct __sk_buff *skb)
{
    u32 inst = pcn_meta_instance(skb);
    struct cap_cfg *cfg = cap_cfgs.lookup(&inst);
    if (!cfg)
        return pcn_pass(skb);
    u32 snaplen = cfg->snaplen;
    u32 budget = cfg->budget;
    if (cfg->port && cfg->port != pcn_meta_port(skb))
        return pcn_pass(skb); /* another pod's frame: not this reader's to count */
    if (!cap_match(skb, inst, cfg->n_insns))
        return pcn_pass(skb);
    cap_count(inst, CAP_STAT_MATCHED);

    u64 now = bpf_ktime_get_ns();
    struct rate_budget *b = cap_budget.lookup(&inst);
    if (!b || !ratebudget_take(b, now, budget))
        return cap_done(skb, inst, CAP_STAT_NOT_COPIED);
    u32 len = skb->len;
    if (len > snaplen)
        len = snaplen;
    if (len == 0 || len > CAP_SNAP_MAX)
        return cap_done(skb, inst, CAP_STAT_NOT_COPIED); /* the agent bounds snaplen */
    u32 zero = 0;
    struct cap_scratch *s = cap_scratch.lookup(&zero);
    if (!s)
        return cap_done(skb, inst, CAP_STAT_LOST);
    /* the same value, in a form whose bounds (1..CAP_SNAP_MAX, a power of
     * two) the verifier sees on the register the helper gets: clang copies
     * `len` before the checks above otherwise */
    len = ((len - 1) & (CAP_SNAP_MAX - 1)) + 1;
    if (bpf_skb_load_bytes(skb, 0, s->data, len) < 0)
        return cap_done(skb, inst, CAP_STAT_LOST);
    s->ev.ts_ns = now;
    s->ev.inst = inst;
    s->ev.port = pcn_meta_port(skb);
    s->ev.wire_len = skb->len;
    s->ev.cap_len = len;
    s->ev.hook = pcn_meta_hook(skb);
    if (cap_events.ringbuf_output(s, sizeof(s->ev) + len, 0) < 0)
        return cap_done(skb, inst, CAP_STAT_LOST);
    return cap_done(skb, inst, CAP_STAT_COPIED);
}
