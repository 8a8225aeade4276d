/* Shared-prefix ("cascade") decode attention for CPU: query rows whose block tables start with the
 * same blocks read those blocks once per step for all of them, instead of once per row.
 *
 * Many sequences of a step often share a long prefix (a system prompt, few-shot examples, the n
 * samples of one prompt): the prefix cache stores its K/V once, but a per-row kernel
 * (paged_attention.c) reads it once per row. Here attention of such a group runs in two parts
 * (Hydragen, RelayAttention):
 *   1. every query of the group against the shared blocks, one KV head at a time: all of the
 *      group's rows x the head's GQA query heads form one matrix, the shared keys are loaded once
 *      in panels and multiplied against it as register-tiled matrix products (cascade_panel.h),
 *      keeping an online softmax state (running max m, sum l, unnormalised output acc) per query;
 *   2. each row against its own blocks past the shared ones, continuing from that state.
 * Continuing an online softmax from another's state is the exact log-sum-exp merge of the two
 * partial attentions (scale by exp(m_old - m_new), add), so results equal one pass over the whole
 * context up to float rounding. Shared blocks are split into chunks across threads; the chunks'
 * states are merged the same way.
 *
 * Layouts as paged_attention.c (q, out [num_seqs, num_heads, head_dim]; caches [blocks, block_size,
 * num_kv_heads, head_dim]; block_table [num_seqs, max_blocks]; the first num_write rows' new K/V
 * stored first). `shared` describes the groups (fuselm_kernels.h). A group's shared blocks must
 * hold no slot written in this step. Needs head_dim % 16 == 0 and block_size % 16 == 0. The math of
 * the shared pass is in cascade_panel.h, that of a row's own blocks in attention_f32_avx512.h or
 * attention_bf16_avx512.h (the per-row decode kernels, resumed from the merged state, with AVX-512) or
 * cascade_blocks.h (the rest); this file spreads the work over threads. fuselm_cascade_attention_int8
 * does the same over an int8 cache.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_bf16_avx512.h"
#include "attention_f32_avx2.h"
#include "attention_f32_avx512.h"
#include "bf16_simd.h"
#include "cascade_blocks.h"
#include "cascade_panel.h"

/* A row's own blocks (step 2) where no per-row decode kernel takes them (below: bf16 queries without AVX-512,
 * an int8 cache): with AVX-512, cascade_blocks.h's per-block dot products suit a row's few queries best;
 * without it, their 16-lane vectors are pairs of ymm registers the compiler spills, and the panel path with
 * its 8-lane slices is faster (64 rows sharing 2,000 tokens + ~117 of their own, float32, one thread of a
 * 2-vCPU AMD EPYC: 4.1 ms a layer against 7.8 with AVX2; 2.6 against 2.1 with AVX-512). */
#if defined(__AVX512F__)
#define OWN_BLOCKS_BY_PANEL 0
#else
#define OWN_BLOCKS_BY_PANEL 1
#endif
#include "fuselm_kernels.h"

#define CHUNK_MIN_BLOCKS 4 /* fewest shared blocks a thread takes as one piece of work */

/* Per-thread scratch for one span of blocks. qb: the queries as unscaled bf16 [M, D] when the scores
 * take the bf16 path (block_scores_bf16), else NULL. */
typedef struct {
    float *scores, *kt, *k_rows, *v_rows;
    uint16_t *qb;
    float scale;
} Scratch;

/* Ask for head h's K and V rows of the block starting at cache row first_row (the hardware prefetcher
 * cannot guess where the next block of a table lies). */
static inline void prefetch_head_rows(const void *k_cache, const void *v_cache, int kv_dtype, int64_t first_row,
                                      int64_t h, int64_t row_elems, int64_t bs, int64_t D) {
    const int64_t width = kv_dtype == FUSELM_F32 ? 4 : 2;
    for (int64_t t = 0; t < bs; t++) {
        const int64_t at = ((first_row + t) * row_elems + h * D) * width;
        for (int64_t off = 0; off < D * width; off += 64) {
            __builtin_prefetch((const char *)k_cache + at + off);
            __builtin_prefetch((const char *)v_cache + at + off);
        }
    }
}

/* Attend M queries of KV head h (Q [M, D], pre-scaled; w.qb, when set, the same unscaled in bf16) to context positions [first_block * bs, len) of
 * one block table, continuing the state st. */
static void attend_span(const float *Q, int64_t M, State st, const void *k_cache, const void *v_cache, int kv_dtype,
                        const int64_t *table, int64_t first_block, int64_t len, int64_t h, int64_t row_elems,
                        int64_t D, int64_t bs, Scratch w) {
    for (int64_t b = first_block, start = first_block * bs; start < len; b++, start += bs) {
        const int64_t count = len - start < bs ? len - start : bs;
        const int64_t first_row = table[b] * bs;
        if (start + bs < len) /* blocks sit anywhere in the pool: fetch the next one's rows of this head now */
            prefetch_head_rows(k_cache, v_cache, kv_dtype, table[b + 1] * bs, h, row_elems, bs, D);
        int64_t ks, vs;
#ifdef HAVE_BF16_SCORES
        if (w.qb != NULL)
            block_scores_bf16(w.qb, M, (const uint16_t *)k_cache + first_row * row_elems + h * D, row_elems, count, D,
                              w.scale, w.scores, bs, (uint16_t *)w.kt);
        else
#endif
        {
            const float *K = head_rows(k_cache, kv_dtype, first_row, h, row_elems, count, D, w.k_rows, &ks);
            block_scores(Q, M, K, ks, count, D, w.scores, bs, w.kt);
        }
        const float *V = head_rows(v_cache, kv_dtype, first_row, h, row_elems, count, D, w.v_rows, &vs);
        block_update(st, M, w.scores, bs, count, V, vs, D);
    }
}

/* Scaled float queries [G, D] of KV head h of row n (its query heads h*G .. h*G + G - 1). */
static void gather_queries(const void *q, int dtype, int64_t n, int64_t h, int64_t G, int64_t num_heads, int64_t D,
                           float scale, float *dst) {
    const int64_t base = (n * num_heads + h * G) * D;
    for (int64_t i = 0; i < G * D; i++)
        dst[i] = scale * (dtype == FUSELM_F32 ? ((const float *)q)[base + i] : bf16_to_f32(((const uint16_t *)q)[base + i]));
}

static inline void store_new_row(void *cache, int64_t slot, const void *src, int64_t index, int64_t elems, int dtype,
                                 int kv_dtype) {
    if (kv_dtype == FUSELM_F32) {
        float *d = (float *)cache + slot * elems;
        for (int64_t i = 0; i < elems; i++)
            d[i] = dtype == FUSELM_F32 ? ((const float *)src)[index * elems + i]
                                       : bf16_to_f32(((const uint16_t *)src)[index * elems + i]);
    } else {
        uint16_t *d = (uint16_t *)cache + slot * elems;
        for (int64_t i = 0; i < elems; i++)
            d[i] = dtype == FUSELM_BF16 ? ((const uint16_t *)src)[index * elems + i]
                                        : f32_to_bf16(((const float *)src)[index * elems + i]);
    }
}

int fuselm_cascade_supported(int64_t head_dim, int64_t block_size) {
    return head_dim % LANES == 0 && block_size % LANES == 0 && head_dim <= 1024;
}

/* The shared pass's partial states of a step: per group its chunks' states (KV head-major, then chunk), and which
 * group and place in it each row has. */
typedef struct {
    float *states;
    const int64_t *state_at, *chunks, *offsets, *shared_blocks, *row_group, *row_index;
    int64_t G, D;
} SharedStates;

/* The first block of row n past the blocks its group shares (0 for a row in no group). */
static inline int64_t own_first_block(const SharedStates *s, int64_t n) {
    return s->row_group[n] >= 0 ? s->shared_blocks[s->row_group[n]] : 0;
}

/* st (G queries) = row n's KV head h state over its group's shared blocks: the chunks' states merged (empty for a
 * row in no group). */
static void row_shared_state(const SharedStates *s, int64_t n, int64_t h, State st) {
    const int64_t g = s->row_group[n], G = s->G, D = s->D;
    reset_state(st, G, D);
    if (g < 0) return;
    const int64_t M = (s->offsets[g + 1] - s->offsets[g]) * G;
    for (int64_t c = 0; c < s->chunks[g]; c++) {
        float *base = s->states + s->state_at[g] + (h * s->chunks[g] + c) * M * (D + 2);
        const State part = {base, base + M, base + 2 * M};
        for (int64_t j = 0; j < G; j++) merge_state(st, j, part, s->row_index[n] * G + j, D);
    }
}

/* Both entry points' work; k_scale / v_scale: an int8 cache's scales (kv_dtype FUSELM_I8), else NULL. */
static void cascade_attention(const void *q, void *out, void *k_cache, void *v_cache, const uint16_t *k_scale,
                              const uint16_t *v_scale, const void *k_new, const void *v_new, int64_t num_write,
                              const int64_t *block_table, const int64_t *ctx_lens, int64_t num_seqs,
                              int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                              int64_t block_size, float scale, int dtype, int kv_dtype, int num_threads,
                              const int64_t *shared) {
    const PagedKv kv = {k_cache, v_cache, k_scale, v_scale, kv_dtype, num_kv_heads};
    const int64_t D = head_dim, bs = block_size, Hkv = num_kv_heads, G = num_heads / num_kv_heads;
    const int64_t row_elems = Hkv * D;
    const int64_t num_groups = shared[0];
    const int64_t *offsets = shared + 1, *shared_blocks = shared + 2 + num_groups, *rows = shared + 2 + 2 * num_groups;
    /* which group each row belongs to (-1: none) and its index in it */
    int64_t *row_group = malloc(sizeof(int64_t) * (size_t)(2 * num_seqs));
    int64_t *row_index = row_group + num_seqs;
    for (int64_t n = 0; n < num_seqs; n++) row_group[n] = -1;
    /* prefix work items: (group, KV head, chunk of shared blocks), each with its own partial state */
    int64_t *item_first = malloc(sizeof(int64_t) * (size_t)(num_groups + 1));
    int64_t *chunks = malloc(sizeof(int64_t) * (size_t)(num_groups + 1));
    int64_t *state_at = malloc(sizeof(int64_t) * (size_t)(num_groups + 1)); /* float offset of group's states */
    int64_t num_items = 0, state_floats = 0, max_m = 1;
    const int64_t target_items = 4 * (int64_t)num_threads;
    for (int64_t g = 0; g < num_groups; g++) {
        const int64_t R = offsets[g + 1] - offsets[g];
        for (int64_t r = 0; r < R; r++) {
            row_group[rows[offsets[g] + r]] = g;
            row_index[rows[offsets[g] + r]] = r;
        }
        int64_t c = (target_items + num_groups * Hkv - 1) / (num_groups * Hkv);
        const int64_t most = shared_blocks[g] / CHUNK_MIN_BLOCKS;
        while ((num_groups * Hkv * c) % num_threads != 0 && c < most) c++; /* the same work for every thread */
        c = c > most ? most : c;
        chunks[g] = c < 1 ? 1 : c;
        item_first[g] = num_items;
        state_at[g] = state_floats;
        num_items += Hkv * chunks[g];
        state_floats += Hkv * chunks[g] * R * G * (D + 2);
        max_m = R * G > max_m ? R * G : max_m;
    }
    item_first[num_groups] = num_items;
    float *states = malloc(sizeof(float) * (size_t)(state_floats > 0 ? state_floats : 1));
    const SharedStates merged = {states, state_at, chunks, offsets, shared_blocks, row_group, row_index, G, D};
    int own_by_row = 0; /* a row's own blocks through a per-row kernel: 1 the float32 queries' one, 2 the bf16 one */
#if defined(__AVX512F__)
    if (dtype == FUSELM_F32 && (kv_dtype == FUSELM_F32 || kv_dtype == FUSELM_BF16) && D <= F32_AVX512_MAX_DIM)
        own_by_row = 1;
#elif defined(HAVE_F32_FAST_PATH)
    if (dtype == FUSELM_F32 && (kv_dtype == FUSELM_F32 || kv_dtype == FUSELM_BF16) && D <= F32_AVX2_MAX_DIM)
        own_by_row = 1;
#endif
#ifdef HAVE_BF16_FAST_PATH
    if (dtype == FUSELM_BF16 && kv_dtype == FUSELM_BF16 && D % 32 == 0 && D <= MAX_DIM) own_by_row = 2;
#endif

    /* the shared pass on bf16 panels (cascade_panel.h): bf16 queries over a bf16 cache, with AVX-512-BF16 */
    int bf16_panels = 0;
#ifdef HAVE_BF16_PANELS
    bf16_panels = dtype == FUSELM_BF16 && kv_dtype == FUSELM_BF16 && D % 32 == 0;
#endif

#pragma omp parallel num_threads(num_threads)
    {
        const int64_t mq = max_m > G ? max_m : G;
        float *Q = malloc(sizeof(float) * (size_t)(mq * D));
        Scratch w = {malloc(sizeof(float) * (size_t)(mq * bs)), malloc(sizeof(float) * (size_t)(D * bs)),
                     malloc(sizeof(float) * (size_t)(bs * D)), malloc(sizeof(float) * (size_t)(bs * D)), NULL, scale};
        uint16_t *qb = NULL;
#ifdef HAVE_BF16_SCORES
        if (dtype == FUSELM_BF16 && kv_dtype == FUSELM_BF16) qb = malloc(sizeof(uint16_t) * (size_t)(mq * D));
#endif
        float *own = malloc(sizeof(float) * (size_t)(G * (D + 2)));
        float *row_acc = NULL, *row_scores = NULL, *row_m = NULL, *row_l = NULL; /* a whole row's state (own_by_row) */
        if (own_by_row) {
            row_acc = malloc(sizeof(float) * (size_t)(num_heads * D));
            row_scores = malloc(sizeof(float) * (size_t)(num_heads * bs));
            row_m = malloc(sizeof(float) * (size_t)num_heads);
            row_l = malloc(sizeof(float) * (size_t)num_heads);
        }
        const int64_t mp = (mq + PL - 1) / PL * PL;
        PanelScratch pw = {malloc(sizeof(float) * (size_t)(D * mp)), malloc(sizeof(float) * (size_t)(D * mp)),
                           malloc(sizeof(float) * (size_t)mp), malloc(sizeof(float) * (size_t)mp),
                           malloc(sizeof(float) * (size_t)(PANEL * D)), malloc(sizeof(float) * (size_t)(PANEL * D)),
                           malloc(sizeof(float) * (size_t)(PANEL * RV * PL)), NULL};
        if (bf16_panels) pw.ps = malloc(sizeof(uint32_t) * (size_t)(PANEL / 2 * RV * PL));

        if (k_new != NULL) { /* this step's single-token rows: their K/V go in before anything is read */
#pragma omp for schedule(static)
            for (int64_t n = 0; n < num_write; n++) {
                const int64_t pos = ctx_lens[n] - 1;
                const int64_t slot = block_table[n * max_blocks + pos / bs] * bs + pos % bs;
                store_new_row(k_cache, slot, k_new, n, row_elems, dtype, kv_dtype);
                store_new_row(v_cache, slot, v_new, n, row_elems, dtype, kv_dtype);
            }
        }

        /* 1. shared blocks: every query of a group and KV head against a chunk of them */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < num_items; it++) {
            int64_t g = 0;
            while (item_first[g + 1] <= it) g++;
            const int64_t local = it - item_first[g], h = local / chunks[g], c = local % chunks[g];
            const int64_t R = offsets[g + 1] - offsets[g], M = R * G;
            float *base = states + state_at[g] + local * M * (D + 2);
            const int64_t b0 = shared_blocks[g] * c / chunks[g], b1 = shared_blocks[g] * (c + 1) / chunks[g];
            const State st = {base, base + M, base + 2 * M};
            const int64_t *table = block_table + rows[offsets[g]] * max_blocks;
#ifdef HAVE_BF16_PANELS
            if (bf16_panels) { /* qb: the group's raw bf16 queries (allocated for bf16 queries over a bf16 cache) */
                for (int64_t r = 0; r < R; r++)
                    memcpy(qb + r * G * D, (const uint16_t *)q + (rows[offsets[g] + r] * num_heads + h * G) * D,
                           sizeof(uint16_t) * (size_t)(G * D));
                shared_span_bf16(qb, M, scale, st, kv, table, b0 * bs, b1 * bs, h, D, bs, pw);
                continue;
            }
#endif
            for (int64_t r = 0; r < R; r++)
                gather_queries(q, dtype, rows[offsets[g] + r], h, G, num_heads, D, scale, Q + r * G * D);
            shared_span(Q, M, st, kv, table, b0 * bs, b1 * bs, h, D, bs, pw, 1);
        }

        /* 2. each row's own blocks, continuing from its group's merged state; then normalise. Float32 queries
         * over a float32 or bfloat16 cache take the per-row decode kernel (attention_f32_avx512.h, or
         * attention_f32_avx2.h without AVX-512; bf16 queries over a bf16 cache attention_bf16_avx512.h's), all
         * heads of a row in one item: it reads each own block whole and asks for the next one's lines spread over
         * its arithmetic, where the per-(row, head) items below stall on every block. 64 rows sharing 2,000
         * tokens with ~95 of their own, 30 layers, 2 threads: on a Zen 4 EPYC the own blocks took 19.5 ms of the
         * step beyond the shared pass against ~8 ms in the per-row kernel; on a Zen 3 EPYC (AVX2) the panel items
         * took ~42 ms, the AVX2 per-row kernel ~21 (the whole step 1.52x -> 1.95x the per-row kernel's). */
#if defined(__AVX512F__) || defined(HAVE_F32_FAST_PATH)
        if (own_by_row) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t n = 0; n < num_seqs; n++) {
                for (int64_t h = 0; h < Hkv; h++)
                    row_shared_state(&merged, n, h, (State){row_m + h * G, row_l + h * G, row_acc + h * G * D});
                const int64_t first_block = own_first_block(&merged, n);
                /* the row this thread most likely takes next (items go out in turn): its first own block's lines
                 * are asked for during this row's last block */
                const int64_t n2 = n + num_threads, fb2 = n2 < num_seqs ? own_first_block(&merged, n2) : 0;
                const int64_t after = n2 < num_seqs && fb2 * bs < ctx_lens[n2] ? block_table[n2 * max_blocks + fb2] : -1;
#ifdef HAVE_BF16_FAST_PATH
                if (own_by_row == 2) {
                    seq_attention_bf16_any((const uint16_t *)q + n * num_heads * D, (uint16_t *)out + n * num_heads * D,
                                           (const uint16_t *)k_cache, (const uint16_t *)v_cache,
                                           block_table + n * max_blocks, first_block * bs, ctx_lens[n], num_heads, Hkv,
                                           D, row_elems, bs, scale, row_acc, row_scores, row_m, row_l, 1, after);
                    continue;
                }
#endif
                const float *qn = (const float *)q + n * num_heads * D;
                float *on = (float *)out + n * num_heads * D;
#if !defined(__AVX512F__)
                (void)after; /* the AVX2 kernel asks for its next block's lines within the row only */
                seq_attention_f32_avx2_any(qn, on, k_cache, v_cache, block_table + n * max_blocks, first_block * bs,
                                           ctx_lens[n], num_heads, Hkv, D, row_elems, bs, scale, row_acc, row_scores,
                                           row_m, row_l, kv_dtype != FUSELM_F32, 1);
#else
                seq_attention_f32_avx512_any(qn, on, k_cache, v_cache, block_table + n * max_blocks, first_block * bs,
                                             ctx_lens[n], num_heads, Hkv, D, row_elems, bs, scale, row_acc, row_scores,
                                             row_m, row_l, kv_dtype != FUSELM_F32, 1, after);
#endif
            }
        }
#endif
        if (!own_by_row) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < num_seqs * Hkv; it++) {
                const int64_t n = it / Hkv, h = it % Hkv, first_block = own_first_block(&merged, n);
                const State st = {own, own + G, own + 2 * G};
                row_shared_state(&merged, n, h, st);
                gather_queries(q, dtype, n, h, G, num_heads, D, scale, Q);
                w.qb = NULL;
                if (qb != NULL && D % 32 == 0) {
                    memcpy(qb, (const uint16_t *)q + (n * num_heads + h * G) * D, sizeof(uint16_t) * (size_t)(G * D));
                    w.qb = qb;
                }
                if (OWN_BLOCKS_BY_PANEL || kv_dtype == FUSELM_I8)
                    shared_span(Q, G, st, kv, block_table + n * max_blocks, first_block * bs, ctx_lens[n], h, D, bs, pw, 0);
                else
                    attend_span(Q, G, st, k_cache, v_cache, kv_dtype, block_table + n * max_blocks, first_block,
                                ctx_lens[n], h, row_elems, D, bs, w);
                for (int64_t j = 0; j < G; j++) {
                    const float inv = 1.0f / st.l[j];
                    const int64_t o = (n * num_heads + h * G + j) * D;
                    for (int64_t d = 0; d < D; d++) {
                        const float x = st.acc[j * D + d] * inv;
                        if (dtype == FUSELM_F32)
                            ((float *)out)[o + d] = x;
                        else
                            ((uint16_t *)out)[o + d] = f32_to_bf16(x);
                    }
                }
            }
        }
        free(Q), free(qb), free(w.scores), free(w.kt), free(w.k_rows), free(w.v_rows), free(own);
        free(row_acc), free(row_scores), free(row_m), free(row_l);
        free(pw.qt), free(pw.acc), free(pw.m), free(pw.l), free(pw.kp), free(pw.vp), free(pw.s), free(pw.ps);
    }
    free(states), free(state_at), free(chunks), free(item_first), free(row_group);
}

void fuselm_cascade_attention(const void *q, void *out, void *k_cache, void *v_cache, const void *k_new,
                              const void *v_new, int64_t num_write, const int64_t *block_table, const int64_t *ctx_lens,
                              int64_t num_seqs, int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim, int64_t block_size, float scale, int dtype, int kv_dtype,
                              int num_threads, const int64_t *shared) {
    cascade_attention(q, out, k_cache, v_cache, NULL, NULL, k_new, v_new, num_write, block_table, ctx_lens, num_seqs,
                      max_blocks, num_heads, num_kv_heads, head_dim, block_size, scale, dtype, kv_dtype, num_threads,
                      shared);
}

void fuselm_cascade_attention_int8(const void *q, void *out, int8_t *k_cache, int8_t *v_cache, uint16_t *k_scale,
                                   uint16_t *v_scale, const void *k_new, const void *v_new, int64_t num_write,
                                   const int64_t *block_table, const int64_t *ctx_lens, int64_t num_seqs,
                                   int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                   int64_t block_size, float scale, int dtype, int num_threads, const int64_t *shared) {
    if (k_new != NULL) /* quantised as every int8 store is (paged_attention_int8.c) before anything is read */
        fuselm_store_kv_rows_int8(k_cache, v_cache, k_scale, v_scale, k_new, v_new, 0, num_write, block_table, ctx_lens,
                                  max_blocks, num_kv_heads, head_dim, block_size, dtype);
    cascade_attention(q, out, k_cache, v_cache, k_scale, v_scale, NULL, NULL, 0, block_table, ctx_lens, num_seqs,
                      max_blocks, num_heads, num_kv_heads, head_dim, block_size, scale, dtype, FUSELM_I8, num_threads,
                      shared);
}
