/* Token buckets: a byte budget refilled at a constant rate, capped at a burst.
 *
 * Units. Tokens are bytes in 32.32 fixed point, so a refill never rounds a
 * fraction of a byte away: at 10 kbit/s a bucket gains 1.25e-6 byte per ns,
 * 5369/2^32 in fixed point (0.006 % off, in the agent's rounding of the rate,
 * once; nothing is lost per packet since `last_ns` always moves to now and
 * the fraction stays in `tokens_fp`). The agent converts:
 *     rate_fp  = round(rate_bit_s * 2^32 / 8e9)   bytes per ns, 32.32
 *     burst_fp = burst_bytes << 32
 *     fill_ns  = ceil(burst_fp / rate_fp)          an empty bucket is full after it
 *
 * Overflow. A refill adds dt * rate_fp only when dt < fill_ns, so the sum is
 * below burst_fp (what the bucket held) + burst_fp + rate_fp; with bursts up to
 * 2^30 bytes (2^62 in fixed point) and rates up to 1 Pbit/s (rate_fp < 2^49)
 * that is below 2^64. Longer idle periods are clamped to a full bucket without
 * a multiplication, so 1e12 bit/s after an hour idle is as safe as after 1 us.
 *
 * Concurrency. Several CPUs run the same bucket (a pod's flows are spread
 * over CPUs by RPS/XPS, a shared bucket serves several pods). The refill and
 * the take are one read-modify-write of two fields (tokens and last_ns) that
 * must stay consistent with each other: two atomic adds cannot express "refill
 * from the last timestamp, then take if enough", and a compare-and-swap loop
 * has no bound the verifier accepts. A bpf_spin_lock in the bucket makes the
 * update exact; it is held for a dozen instructions without helper calls. The
 * clock is read before taking the lock (no helper may run under it), so a CPU
 * may arrive with a timestamp older than `last_ns`: it refills nothing and
 * `last_ns` never goes backwards. */
#ifndef PCN_TBF_H
#define PCN_TBF_H

#include "pcn_helpers.h"

/* A bucket's state; the lock must be a top-level field of the map value. */
struct pcn_tbf {
    struct bpf_spin_lock lock;
    u32 pad;
    u64 tokens_fp; /* bytes, 32.32 fixed point, <= burst_fp */
    u64 last_ns;   /* bpf_ktime_get_ns() of the last refill */
};

/* Its parameters, computed by the agent (see above). */
struct pcn_tbf_params {
    u64 rate_fp;
    u64 burst_fp;
    u64 fill_ns;
};

/* Refill `b` up to `now` and take `bytes` from it if it holds as many.
 * Returns 1 when the packet conforms (tokens taken), 0 when it exceeds. */
static __always_inline int pcn_tbf_take(struct pcn_tbf *b, const struct pcn_tbf_params *p,
                                        u64 now, u32 bytes)
{
    u64 rate_fp = p->rate_fp, burst_fp = p->burst_fp, fill_ns = p->fill_ns;
    u64 cost_fp = (u64)bytes << 32;
    int conform;

    bpf_spin_lock(&b->lock);
    u64 tokens = b->tokens_fp;
    if (now > b->last_ns) {
        u64 dt = now - b->last_ns;
        if (dt >= fill_ns)
            tokens = burst_fp; /* idle long enough to be full: no product to overflow */
        else
            tokens += dt * rate_fp;
        b->last_ns = now;
    }
    if (tokens > burst_fp) /* refilled past the cap, or the burst was lowered */
        tokens = burst_fp;
    conform = tokens >= cost_fp;
    if (conform)
        tokens -= cost_fp;
    b->tokens_fp = tokens;
    bpf_spin_unlock(&b->lock);
    return conform;
}

#endif
