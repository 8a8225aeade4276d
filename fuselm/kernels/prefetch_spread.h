/* Software prefetch of the next K/V block spread over the work on the current one.
 *
 * Decode attention reads its blocks from anywhere in the pool, so the hardware prefetcher cannot run
 * ahead across them, and the kernels ask for the next block while computing the current one. How the
 * requests are issued decides whether the reads overlap the arithmetic: in bursts (the whole block at
 * once, or a slice of it per query head) the requests beyond the core's outstanding misses wait in the
 * load pipeline, and the kernel reads little faster than with no prefetch at all. A few lines per step
 * of the work, interleaved with that step's loads and FMAs, keep misses in flight throughout.
 * SmolLM2-135M's float32 decode attention, 128 rows of 304 tokens in shuffled blocks, 2 threads on a
 * Zen 4 EPYC: 12.6 GB/s with a slice per head, 20.4 GB/s spread (docs/performance.md).
 *
 * Where the steps go matters too: a step inside a fully unrolled loop of register accumulators (per key
 * of a 16-key score tile) made the compiler spill the accumulators, and the kernel ran 0.72-0.8x as fast
 * on blocks already in cache; between such loops (per 16 keys x 16 dimensions) it runs 0.85-0.95x there.
 *
 * Header-only; included by the attention kernels.
 */
#ifndef FUSELM_PREFETCH_SPREAD_H
#define FUSELM_PREFETCH_SPREAD_H
#include <stdint.h>

/* One share of a block's cache lines, prefetched into L2 a fixed number of lines per step of the work (a
 * count that never changes within a call: the loop's branch is always predicted). */
typedef struct {
    const char *block;
    int64_t lo, last; /* the share is lines lo .. last */
    int64_t per_step; /* lines asked for per step; steps past the share ask for its last line again */
    int64_t row_lines, row_stride; /* prefetch_share_rows: row_lines lines of every row_stride */
} PrefetchShare;

/* Share `part` of `parts` equal shares of the `lines` lines from `block`, spread over `steps` steps; block
 * NULL (no next block) gives an empty share. */
static inline PrefetchShare prefetch_share(const char *block, int64_t lines, int64_t part, int64_t parts, int64_t steps) {
    PrefetchShare s = {block, 0, 0, 0, 0, 0};
    if (block == NULL || steps <= 0) return s;
    s.lo = lines * part / parts;
    s.last = lines * (part + 1) / parts - 1;
    s.per_step = s.last < s.lo ? 0 : (s.last - s.lo + steps) / steps;
    return s;
}

/* Ask for step `step`'s lines (steps 0 .. steps - 1 together ask for the whole share). */
static inline void prefetch_step(const PrefetchShare *s, int64_t step) {
    for (int64_t i = 0; i < s->per_step; i++) {
        const int64_t line = s->lo + s->per_step * step + i;
        __builtin_prefetch(s->block + 64 * (line < s->last ? line : s->last), 0, 2);
    }
}

/* prefetch_share over part of each row: the first `row_lines` lines of every `row_stride` from `block`, `rows`
 * rows (one work item's KV heads, where a row's heads are split between threads: each thread then asks for the
 * lines it reads, where the whole block's would have both threads fetch all of it). Steps with
 * prefetch_rows_step; a separate call so that whole-block kernels keep their loop as it is (a branch on the
 * share's kind there cost 3-7% at 2-64 rows). */
static inline PrefetchShare prefetch_share_rows(const char *block, int64_t rows, int64_t row_lines, int64_t row_stride,
                                                int64_t part, int64_t parts, int64_t steps) {
    PrefetchShare s = prefetch_share(block, rows * row_lines, part, parts, steps);
    s.row_lines = row_lines, s.row_stride = row_stride;
    return s;
}

static inline void prefetch_rows_step(const PrefetchShare *s, int64_t step) {
    for (int64_t i = 0; i < s->per_step; i++) {
        const int64_t line = s->lo + s->per_step * step + i, at = line < s->last ? line : s->last;
        __builtin_prefetch(s->block + 64 * (at / s->row_lines * s->row_stride + at % s->row_lines), 0, 2);
    }
}

/* Whether a work item whose KV heads are part of a cache row (paged_attention.c splits a row's heads between
 * threads) can ask for only its own lines of each row: its heads' bytes differ from the row's, both fill whole
 * lines, and the caches (pointing at the item's first head) are line-aligned. */
static inline int prefetch_own_rows(int64_t item_bytes, int64_t row_bytes, const void *k_cache, const void *v_cache) {
    return item_bytes != row_bytes && item_bytes % 64 == 0 && row_bytes % 64 == 0 && (uintptr_t)k_cache % 64 == 0 &&
           (uintptr_t)v_cache % 64 == 0;
}

/* A work item's share of the next block: with `own_rows` (a constant where inlined) its `row_lines` lines of every
 * `row_stride` (prefetch_share_rows), else all `block_lines` lines of the block (prefetch_share). */
static inline __attribute__((always_inline)) PrefetchShare prefetch_item_share(const char *block, int own_rows,
                                                                               int64_t rows, int64_t row_lines,
                                                                               int64_t row_stride, int64_t block_lines,
                                                                               int64_t part, int64_t parts,
                                                                               int64_t steps) {
    return own_rows ? prefetch_share_rows(block, rows, row_lines, row_stride, part, parts, steps)
                    : prefetch_share(block, block_lines, part, parts, steps);
}

/* prefetch_rows_step or prefetch_step, for a share of prefetch_item_share with the same `own_rows`. */
static inline __attribute__((always_inline)) void prefetch_item_step(const PrefetchShare *s, int own_rows,
                                                                     int64_t step) {
    if (own_rows)
        prefetch_rows_step(s, step);
    else
        prefetch_step(s, step);
}

#endif
