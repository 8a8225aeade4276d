/* A prompt chunk's causal attention over its cached context and itself, for CPU, as register-tiled
 * matrix products.
 *
 * A prompt chunk's n new tokens attend to the request's cached positions and, causally, to each other.
 * torch's SDPA does this one chunk and layer at a time as small sgemm calls (25-75 GFLOP/s on 2 threads
 * of a Zen 4 EPYC for SmolLM2's 9 query / 3 KV heads of 64 at 32-512 tokens), and with a cached context
 * it takes an explicit mask and a gathered copy of the context. Here the work is the shared pass of
 * cascade attention (cascade_panel.h): for one KV head and a tile of CHUNK_TILE positions of the chunk,
 * all the tile's queries (every query head of the KV head) lie along the vector lanes and the keys come
 * in panels of PANEL, read from the paged cache in place through the slot of every position:
 *   1. positions before the tile's first one are seen by every query of the tile: plain panels;
 *   2. the tile's own positions: one panel whose softmax masks each query's later keys
 *      (panel_softmax_causal).
 * A query's result is the online softmax over both, normalised at the end. Work items are (KV head,
 * tile) pairs, the latest tiles (the most keys) first, handed to the threads as they come free.
 *
 * Layouts: q, out [n, num_heads, head_dim] float32; caches [blocks, block_size, num_kv_heads, head_dim]
 * (float32, bfloat16, or int8 with bf16 scales [blocks, block_size, num_kv_heads]) holding the chunk's
 * own K/V already; slots [num_cached + n] int64, the cache slot of every position of the context.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function" /* the panel headers' functions this file does not call */
#include "cascade_panel.h"
#pragma GCC diagnostic pop
#include "fuselm_kernels.h"

#define CHUNK_TILE 32 /* chunk positions per work item */

/* Lanes of a where mask is set, of b elsewhere (mask: all ones or all zeros per lane). */
static inline pvec selectp(pveci mask, pvec a, pvec b) {
    pveci ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const pveci r = (ai & mask) | (bi & ~mask);
    pvec out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* panel_softmax where query lane i (from q0 on) sees only the panel's keys t <= (q0 + i) / group: the
 * panel holds the queries' own positions, `group` query heads per position, queries in position order.
 * Masked keys take no part in the max and get P = 0. Every query sees the panel's key 0, so its max is
 * finite afterwards. */
static void panel_softmax_causal(float *s, int64_t count, int R, float *m, float *l, float *corr, int64_t q0,
                                 int64_t group) {
    const pvec minus_inf = (pvec){0} - INFINITY, zero = {0};
    for (int r = 0; r < R; r++) {
        int32_t at[PL];
        for (int i = 0; i < PL; i++) at[i] = (int32_t)((q0 + r * PL + i) / group);
        pveci position;
        memcpy(&position, at, sizeof position);
        const pvec old = loadp(m + r * PL);
        pvec top = old;
        for (int64_t t = 0; t < count; t++)
            top = maxp(top, selectp(position >= (int32_t)t, loadp(s + t * RV * PL + r * PL), minus_inf));
        pvec sum = {0};
        for (int64_t t = 0; t < count; t++) {
            const pveci seen = position >= (int32_t)t;
            const pvec p = selectp(seen, expp_nonpositive(loadp(s + t * RV * PL + r * PL) - top), zero);
            storep(s + t * RV * PL + r * PL, p);
            sum += p;
        }
        const pvec c = expp_nonpositive(old - top);
        storep(corr + r * PL, c);
        storep(l + r * PL, loadp(l + r * PL) * c + sum);
        storep(m + r * PL, top);
    }
}

/* Keys [first, end) in plain panels (every query of the tile sees them), or, with causal set, the tile's
 * own positions: one panel of at most PANEL keys, query lane i seeing keys up to its position i / group. */
static void tile_span(PanelScratch w, int64_t Mp, PagedKv kv, const int64_t *slots, int64_t first, int64_t end, int64_t h,
                      int64_t D, int causal, int64_t group) {
    float corr[RV * PL];
    for (int64_t p0 = first; p0 < end; p0 += PANEL) {
        const int64_t count = end - p0 < PANEL ? end - p0 : PANEL;
        pack_panel(kv.k, kv.k_scale, kv.dtype, slots, p0, count, 1, h, kv.num_kv_heads, D, w.kp);
        pack_panel(kv.v, kv.v_scale, kv.dtype, slots, p0, count, 1, h, kv.num_kv_heads, D, w.vp);
        if (p0 + PANEL < end) {
            const int64_t next = end - p0 - PANEL < PANEL ? end - p0 - PANEL : PANEL;
            prefetch_panel(kv, slots, p0 + PANEL, next, 1, h, D);
        }
        for (int64_t q0 = 0; q0 < Mp; q0 += RV * PL) {
            const int64_t slices = (Mp - q0) / PL;
            const int R = slices >= RV ? RV : (int)slices;
            if (!causal) {
                if (R == RV) panel_tile(w, Mp, q0, RV, count, D, corr);
#if RV > 1
                else if (R == 1) panel_tile(w, Mp, q0, 1, count, D, corr);
#endif
#if RV > 2
                else panel_tile(w, Mp, q0, 2, count, D, corr);
#endif
                continue;
            }
            /* keys past the row tile's last position are masked for all its queries: not computed */
            const int64_t last = (q0 + R * PL - 1) / group + 1;
            const int64_t seen = last < count ? last : count;
            const int64_t nk = (seen + KT - 1) / KT * KT;
            if (R == RV) score_tiles(w.qt, Mp, q0, RV, w.kp, nk, D, w.s);
#if RV > 1
            else if (R == 1) score_tiles(w.qt, Mp, q0, 1, w.kp, nk, D, w.s);
#endif
#if RV > 2
            else score_tiles(w.qt, Mp, q0, 2, w.kp, nk, D, w.s);
#endif
            panel_softmax_causal(w.s, seen, R, w.m + q0, w.l + q0, corr, q0, group);
            if (R == RV) pv_tiles(w.acc, Mp, q0, RV, w.s, seen, w.vp, D, corr);
#if RV > 1
            else if (R == 1) pv_tiles(w.acc, Mp, q0, 1, w.s, seen, w.vp, D, corr);
#endif
#if RV > 2
            else pv_tiles(w.acc, Mp, q0, 2, w.s, seen, w.vp, D, corr);
#endif
        }
    }
}

int fuselm_chunk_attention_supported(int64_t head_dim) { return head_dim > 0 && head_dim % DT == 0; }

void fuselm_chunk_attention(const float *q, float *out, const void *k_cache, const void *v_cache, const uint16_t *k_scale,
                            const uint16_t *v_scale, const int64_t *slots, int64_t num_cached, int64_t n,
                            int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int kv_dtype,
                            int num_threads) {
    if (n <= 0) return;
    const int64_t group = num_heads / num_kv_heads, D = head_dim;
    const int64_t tiles = (n + CHUNK_TILE - 1) / CHUNK_TILE;
    const int64_t mq = CHUNK_TILE * group, mp = (mq + PL - 1) / PL * PL;
    const PagedKv kv = {k_cache, v_cache, k_scale, v_scale, kv_dtype, num_kv_heads};
    int threads = num_threads;
    if (threads > tiles * num_kv_heads) threads = (int)(tiles * num_kv_heads);
#pragma omp parallel num_threads(threads)
    {
        float *Q = malloc(sizeof(float) * (size_t)(mq * D));
        PanelScratch w = {malloc(sizeof(float) * (size_t)(D * mp)), malloc(sizeof(float) * (size_t)(D * mp)),
                          malloc(sizeof(float) * (size_t)mp), malloc(sizeof(float) * (size_t)mp),
                          malloc(sizeof(float) * (size_t)(PANEL * D)), malloc(sizeof(float) * (size_t)(PANEL * D)),
                          malloc(sizeof(float) * (size_t)(PANEL * RV * PL))};
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < tiles * num_kv_heads; item++) {
            const int64_t tile = tiles - 1 - item / num_kv_heads, h = item % num_kv_heads;
            const int64_t i0 = tile * CHUNK_TILE, i1 = i0 + CHUNK_TILE < n ? i0 + CHUNK_TILE : n;
            const int64_t M = (i1 - i0) * group, Mp = (M + PL - 1) / PL * PL;
            for (int64_t i = i0; i < i1; i++) /* query row (i - i0) * group + g: position i, query head h * group + g */
                for (int64_t g = 0; g < group; g++) {
                    const float *src = q + (i * num_heads + h * group + g) * D;
                    float *dst = Q + ((i - i0) * group + g) * D;
                    for (int64_t d = 0; d < D; d++) dst[d] = src[d] * scale;
                }
            to_lanes(w.qt, Q, M, Mp, D);
            memset(w.acc, 0, sizeof(float) * (size_t)(D * Mp));
            for (int64_t i = 0; i < Mp; i++) w.m[i] = -INFINITY, w.l[i] = 0.0f;
            tile_span(w, Mp, kv, slots, 0, num_cached + i0, h, D, 0, group);
            tile_span(w, Mp, kv, slots, num_cached + i0, num_cached + i1, h, D, 1, group);
            from_lanes(Q, w.acc, M, Mp, D);
            for (int64_t i = i0; i < i1; i++)
                for (int64_t g = 0; g < group; g++) {
                    const int64_t r = (i - i0) * group + g;
                    const float inv = 1.0f / w.l[r];
                    float *dst = out + (i * num_heads + h * group + g) * D;
                    for (int64_t d = 0; d < D; d++) dst[d] = Q[r * D + d] * inv;
                }
        }
        free(Q), free(w.qt), free(w.acc), free(w.m), free(w.l), free(w.kp), free(w.vp), free(w.s);
    }
}
