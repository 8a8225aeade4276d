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
 *      (cascade_panel.h panel_span).
 * A query's result is the online softmax over both, normalised at the end. Work items are (KV head,
 * tile) pairs, the latest tiles (the most keys) first, handed to the threads as they come free.
 *
 * Layouts: q, out [n, num_heads, head_dim] float32 or bfloat16 (dtype); caches [blocks, block_size, num_kv_heads,
 * head_dim] (float32, bfloat16, or int8 with bf16 scales [blocks, block_size, num_kv_heads]) holding the chunk's
 * own K/V already; slots [num_cached + n] int64, the cache slot of every position of the context. bfloat16 queries
 * over a bfloat16 cache take cascade_panel.h's bf16 panels where the build has AVX-512-BF16.
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

int fuselm_chunk_attention_supported(int64_t head_dim) { return head_dim > 0 && head_dim % DT == 0; }

void fuselm_chunk_attention(const void *q, void *out, const void *k_cache, const void *v_cache, const uint16_t *k_scale,
                            const uint16_t *v_scale, const int64_t *slots, int64_t num_cached, int64_t n,
                            int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int dtype,
                            int kv_dtype, int num_threads) {
    if (n <= 0) return;
    const int64_t group = num_heads / num_kv_heads, D = head_dim;
    const int64_t tiles = (n + CHUNK_TILE - 1) / CHUNK_TILE;
    const int64_t mq = CHUNK_TILE * group, mp = (mq + PL - 1) / PL * PL;
    const PagedKv kv = {k_cache, v_cache, k_scale, v_scale, kv_dtype, num_kv_heads};
    /* bf16 queries over a bf16 cache with AVX-512-BF16: the bf16 panels (cascade_panel.h), else float32 throughout */
    int bf16_panels = 0;
#ifdef HAVE_BF16_PANELS
    bf16_panels = dtype == FUSELM_BF16 && kv_dtype == FUSELM_BF16 && D % 32 == 0;
#endif
    int threads = num_threads;
    if (threads > tiles * num_kv_heads) threads = (int)(tiles * num_kv_heads);
#pragma omp parallel num_threads(threads)
    {
        float *Q = malloc(sizeof(float) * (size_t)(mq * D));
        uint16_t *Qb = bf16_panels ? malloc(sizeof(uint16_t) * (size_t)(mq * D)) : NULL;
        PanelScratch w = {malloc(sizeof(float) * (size_t)(D * mp)), malloc(sizeof(float) * (size_t)(D * mp)),
                          malloc(sizeof(float) * (size_t)mp), malloc(sizeof(float) * (size_t)mp),
                          malloc(sizeof(float) * (size_t)(PANEL * D)), malloc(sizeof(float) * (size_t)(PANEL * D)),
                          malloc(sizeof(float) * (size_t)(PANEL * RV * PL)),
                          bf16_panels ? malloc(sizeof(uint32_t) * (size_t)(PANEL / 2 * RV * PL)) : NULL};
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < tiles * num_kv_heads; item++) {
            const int64_t tile = tiles - 1 - item / num_kv_heads, h = item % num_kv_heads;
            const int64_t i0 = tile * CHUNK_TILE, i1 = i0 + CHUNK_TILE < n ? i0 + CHUNK_TILE : n;
            const int64_t M = (i1 - i0) * group, Mp = (M + PL - 1) / PL * PL;
            memset(w.acc, 0, sizeof(float) * (size_t)(D * Mp));
            for (int64_t i = 0; i < Mp; i++) w.m[i] = -INFINITY, w.l[i] = 0.0f;
            /* query row (i - i0) * group + g: position i, query head h * group + g */
#ifdef HAVE_BF16_PANELS
            if (bf16_panels) {
                for (int64_t i = i0; i < i1; i++)
                    memcpy(Qb + (i - i0) * group * D, (const uint16_t *)q + (i * num_heads + h * group) * D,
                           sizeof(uint16_t) * (size_t)(group * D));
                to_lane_pairs((uint32_t *)w.qt, Qb, M, Mp, D);
                panel_span_bf16(w, Mp, kv, slots, 1, 0, num_cached + i0, h, D, 0, scale); /* 1-slot blocks */
                panel_span_bf16(w, Mp, kv, slots, 1, num_cached + i0, num_cached + i1, h, D, group, scale);
            } else
#endif
            {
                for (int64_t i = i0; i < i1; i++)
                    for (int64_t g = 0; g < group; g++) {
                        const int64_t at = (i * num_heads + h * group + g) * D;
                        float *dst = Q + ((i - i0) * group + g) * D;
                        for (int64_t d = 0; d < D; d++)
                            dst[d] = scale * (dtype == FUSELM_F32 ? ((const float *)q)[at + d]
                                                                  : bf16_to_f32(((const uint16_t *)q)[at + d]));
                    }
                to_lanes(w.qt, Q, M, Mp, D);
                panel_span(w, Mp, kv, slots, 1, 0, num_cached + i0, h, D, 0); /* slots: a table of 1-slot blocks */
                panel_span(w, Mp, kv, slots, 1, num_cached + i0, num_cached + i1, h, D, group);
            }
            from_lanes(Q, w.acc, M, Mp, D);
            for (int64_t i = i0; i < i1; i++)
                for (int64_t g = 0; g < group; g++) {
                    const int64_t r = (i - i0) * group + g, at = (i * num_heads + h * group + g) * D;
                    const float inv = 1.0f / w.l[r];
                    for (int64_t d = 0; d < D; d++) {
                        const float x = Q[r * D + d] * inv;
                        if (dtype == FUSELM_F32)
                            ((float *)out)[at + d] = x;
                        else
                            ((uint16_t *)out)[at + d] = f32_to_bf16(x);
                    }
                }
        }
        free(Q), free(Qb), free(w.qt), free(w.acc), free(w.m), free(w.l), free(w.kp), free(w.vp), free(w.s), free(w.ps);
    }
}
