/* Rate bounds: a budget of events per second of the monotonic clock, per
 * owner (a cube instance), shared by every CPU.
 *
 * The window is the current second; the first event of a new second resets
 * the count. Two CPUs crossing into a new second together may both reset it,
 * so a window can admit up to (number of CPUs - 1) events more than the
 * budget: a bound, not an exact quota, and no lock on the fast path. */
#ifndef PCN_RATEBUDGET_H
#define PCN_RATEBUDGET_H

#include "pcn_helpers.h"

struct rate_budget {
    u64 window; /* the second (monotonic ns / 1e9) the count is for */
    u64 used;
};

/* 1 when one more event fits in this second's `budget`, else 0. */
static __always_inline int ratebudget_take(struct rate_budget *b, u64 now_ns, u32 budget)
{
    u64 second = now_ns / 1000000000ULL;
    if (b->window != second) {
        b->window = second;
        b->used = 0;
    }
    u64 n = __sync_fetch_and_add(&b->used, 1);
    return n < budget;
}

#endif
