/* Paged decode attention for CPU: one query token per sequence, keys/values read in place from the
 * block-paged cache (no gather copy), online softmax, float accumulation, OpenMP over
 * sequences. Built at run time by fuselm/kernels/cpu.py; the torch path in
 * fuselm/layers/paged_attention.py is the reference it is tested against.
 *
 * Layouts (all contiguous):
 *   q, out      [num_seqs, num_heads, head_dim]
 *   k/v cache   [num_blocks, block_size, num_kv_heads, head_dim]
 *   block_table [num_seqs, max_blocks] int64, ctx_lens [num_seqs] int64
 *   k_new/v_new [num_write, num_kv_heads, head_dim] in the query dtype, or NULL: the new token of
 *               each of the first num_write rows, written into its slot (position ctx_len - 1)
 *               just before it is read. Rows from num_write on (several query rows of one
 *               sequence, e.g. speculative tokens being verified) must have their K/V stored
 *               before the call: a row reads slots that other rows of its sequence fill.
 * ctx_starts  [num_seqs] int64 or NULL: the first context position each row attends to (a sliding
 *             window's start); blocks before it are never read, so their table entries may be
 *             anything (a windowed KV cache group puts its null block there).
 * dtype (q, out) and kv_dtype (the caches): FUSELM_F32 or FUSELM_BF16.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_simd.h"
#include "fuselm_kernels.h"
#include "prefetch_spread.h"
#include "softmax_exp.h"
#include "attention_bf16_avx512.h"
#include "attention_f32_avx2.h"
#include "attention_f32_avx512.h"

#define MAX_GROUP 16
#define MAX_DIM 256
#define MAX_BLOCK 64

static inline void load_row(const void *base, int64_t index, int64_t dim, int dtype, float *dst) {
    if (dtype == FUSELM_F32) {
        memcpy(dst, (const float *)base + index * dim, (size_t)dim * sizeof(float));
    } else {
        const uint16_t *src = (const uint16_t *)base + index * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) dst[d] = bf16_to_f32(src[d]);
    }
}



int fuselm_max_group(void) { return MAX_GROUP; }
int fuselm_max_dim(void) { return MAX_DIM; }
int fuselm_max_block(void) { return MAX_BLOCK; }

/* 1 when this build has the AVX-512 BF16 path for bf16 queries over a bf16 cache. */
int fuselm_has_bf16_fast_path(void) {
#ifdef HAVE_BF16_FAST_PATH
    return 1;
#else
    return 0;
#endif
}

/* 1 when this build has the AVX-512 path for float32 queries (attention_f32_avx512.h). */
int fuselm_has_f32_avx512_attention(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* Store values [first, first + count) of one new K or V row (src row `index` of `elems` values, dtype
 * src_dtype) into cache slot `slot` (kv_dtype): some of the row's heads, or all of them (store_row). */
static inline void store_heads(void *cache, int64_t slot, const void *src, int64_t index, int64_t elems, int64_t first,
                               int64_t count, int src_dtype, int kv_dtype) {
    const int64_t at = slot * elems + first, from = index * elems + first;
    if (src_dtype == kv_dtype) {
        const size_t width = kv_dtype == FUSELM_F32 ? sizeof(float) : sizeof(uint16_t);
        memcpy((char *)cache + (size_t)at * width, (const char *)src + (size_t)from * width, (size_t)count * width);
    } else if (src_dtype == FUSELM_F32) { /* float32 -> bfloat16 */
        const float *s = (const float *)src + from;
        uint16_t *d = (uint16_t *)cache + at;
        for (int64_t i = 0; i < count; i++) d[i] = f32_to_bf16(s[i]);
    } else { /* bfloat16 -> float32 */
        const uint16_t *s = (const uint16_t *)src + from;
        float *d = (float *)cache + at;
        for (int64_t i = 0; i < count; i++) d[i] = bf16_to_f32(s[i]);
    }
}

/* Store one new K or V row (src row `index`, dtype src_dtype) into cache slot `slot` (kv_dtype). */
static inline void store_row(void *cache, int64_t slot, const void *src, int64_t index, int64_t elems, int src_dtype,
                             int kv_dtype) {
    store_heads(cache, slot, src, index, elems, 0, elems, src_dtype, kv_dtype);
}

/* Cache slot of the last context position of query row n (where its new token's K/V go). */
static inline int64_t last_slot(const int64_t *block_table, const int64_t *ctx_lens, int64_t n, int64_t max_blocks,
                                int64_t block_size) {
    const int64_t pos = ctx_lens[n] - 1;
    return block_table[n * max_blocks + pos / block_size] * block_size + pos % block_size;
}

/* Store the K/V rows [first, last) of a step into their slots (position ctx_lens[n] - 1 of row n's
 * sequence) before fuselm_paged_decode_attention runs: the rows of a sequence with several query
 * rows (speculative tokens being verified) read each other's slots. */
void fuselm_store_kv_rows(void *k_cache, void *v_cache, const void *k_new, const void *v_new, int64_t first,
                          int64_t last, const int64_t *block_table, const int64_t *ctx_lens, int64_t max_blocks,
                          int64_t row_elems, int64_t block_size, int dtype, int kv_dtype) {
    for (int64_t n = first; n < last; n++) {
        const int64_t slot = last_slot(block_table, ctx_lens, n, max_blocks, block_size);
        store_row(k_cache, slot, k_new, n, row_elems, dtype, kv_dtype);
        store_row(v_cache, slot, v_new, n, row_elems, dtype, kv_dtype);
    }
}

/* One work item = one sequence, all heads: each cache row [kv_heads, head_dim] of a block is read
 * once, front to back, which keeps DRAM traffic to one pass over the context. */
void fuselm_paged_decode_attention(const void *q, void *out, void *k_cache, void *v_cache, const void *k_new,
                                   const void *v_new, int64_t num_write, const int64_t *block_table, const int64_t *ctx_lens,
                                   int64_t num_seqs, int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                   int64_t block_size, float scale, int dtype, int kv_dtype,
                                   int num_threads) {
    fuselm_paged_window_attention(q, out, k_cache, v_cache, k_new, v_new, num_write, block_table, ctx_lens, NULL,
                                  num_seqs, max_blocks, num_heads, num_kv_heads, head_dim, block_size, scale, dtype,
                                  kv_dtype, num_threads);
}

/* Which per-sequence path of this build takes these shapes, the first that does in this order; PATH_PORTABLE (the
 * loop at the end of fuselm_paged_window_attention, which never splits a sequence's heads) where none does. */
enum { PATH_PORTABLE = 0, PATH_BF16 = 1, PATH_F32_AVX512 = 2, PATH_F32_AVX2 = 3 };
static int fast_path(int dtype, int kv_dtype, int64_t head_dim, int64_t block_size) {
    (void)dtype, (void)kv_dtype, (void)head_dim, (void)block_size; /* a build without a fast path reads none */
#ifdef HAVE_BF16_FAST_PATH
    if (dtype == FUSELM_BF16 && kv_dtype == FUSELM_BF16 && head_dim % 32 == 0 && block_size % 16 == 0) return PATH_BF16;
#endif
#ifdef __AVX512F__
    if (dtype == FUSELM_F32 && head_dim % 16 == 0 && block_size % 16 == 0 && head_dim <= F32_AVX512_MAX_DIM)
        return PATH_F32_AVX512;
#endif
#ifdef HAVE_F32_FAST_PATH
    if (dtype == FUSELM_F32 && head_dim % 8 == 0 && block_size % 8 == 0) return PATH_F32_AVX2;
#endif
    return PATH_PORTABLE;
}

/* fuselm_paged_decode_attention where row n attends to positions ctx_starts[n] .. ctx_lens[n] - 1
 * only (a sliding window), or to all of them when ctx_starts is NULL.
 *
 * With fewer rows than threads (batch-1 decode) a row's KV heads are split between the threads, each item a
 * run of KV heads with their query heads: one sequence's attention was one thread's work while the others
 * waited. A Mixtral-like layer's attention at batch 1 (4 KV heads, contexts of 16-144) on a 2-vCPU Zen 4, timed
 * inside the C layer step: 21.6-22.7 us split against 24.9-26.4 (the rest is the cold cache's first blocks, not
 * the arithmetic). On the float32 AVX2 path the runs may be uneven, each item prefetching only its own heads'
 * lines (attention_f32_avx2.h): SmolLM2-135M's 3 KV heads as runs of 2 and 1 at batch 1, 2-vCPU Zen 3 EPYC,
 * `benchmarks/attention_kernels.py --decode-shapes 1x150,1x1000,1x2000,1x4000,1x8000`: 1.31x, 1.46x, 1.56x,
 * 1.51x, 1.57x in one run; three earlier runs of the same code ranged 0.92-1.57x, the lows at 600-2,000 tokens
 * (docs/performance.md). With every item prefetching whole blocks, 0.94x at 2,000: both threads read all of
 * each block. The float32 AVX-512 path (attention_f32_avx512.h) does the same: on a 2-vCPU Zen 4 EPYC at batch 1,
 * 150-8,000 tokens, 1.25x, 1.36x, 1.47x, 1.38x, 1.37x, 1.39x at 150 / 600 / 1,000 / 2,000 / 4,000 / 8,000
 * (without the per-item prefetch, runs of 1 and 2 were no better than unsplit there). The bf16 path keeps even
 * runs: uneven ones there were not measured. A head's arithmetic is the same however the heads are split, so
 * the output is too. */
void fuselm_paged_window_attention(const void *q, void *out, void *k_cache, void *v_cache, const void *k_new,
                                   const void *v_new, int64_t num_write, const int64_t *block_table, const int64_t *ctx_lens,
                                   const int64_t *ctx_starts, int64_t num_seqs, int64_t max_blocks, int64_t num_heads,
                                   int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int dtype,
                                   int kv_dtype, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t row_elems = num_kv_heads * head_dim;
    const int64_t q_width = dtype == FUSELM_F32 ? 4 : 2, kv_width = kv_dtype == FUSELM_F32 ? 4 : 2;
    const int path = fast_path(dtype, kv_dtype, head_dim, block_size);
    int64_t splits = 1; /* items per row: runs of KV heads (even ones on the bf16 path) */
    if (num_seqs > 0 && num_seqs < num_threads && path != PATH_PORTABLE) {
        splits = (num_threads + num_seqs - 1) / num_seqs;
        splits = splits < num_kv_heads ? splits : num_kv_heads;
        if (path == PATH_BF16) /* uneven runs measured only on the float32 paths (above) */
            while (num_kv_heads % splits != 0) splits--;
    }
#pragma omp parallel num_threads(num_threads)
    {
        /* per-thread scratch: queries, accumulators [num_heads, head_dim]; scores [num_heads, block] */
        float *qf = malloc(sizeof(float) * (size_t)(num_heads * head_dim));
        float *acc = malloc(sizeof(float) * (size_t)(num_heads * head_dim));
        float *scores = malloc(sizeof(float) * (size_t)(num_heads * block_size));
        float *m = malloc(sizeof(float) * (size_t)num_heads);
        float *l = malloc(sizeof(float) * (size_t)num_heads);
        float *row = malloc(sizeof(float) * (size_t)row_elems);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < num_seqs * splits; item++) {
            const int64_t n = item / splits, part = item % splits;
            /* this item's KV heads [kv0, kv0 + kvh) and their query heads, and where they start in q/out and a cache row */
            const int64_t kv0 = num_kv_heads * part / splits, kvh = num_kv_heads * (part + 1) / splits - kv0;
            const int64_t heads = kvh * group;
            const int64_t q_at = (n * num_heads + kv0 * group) * head_dim, kv_at = kv0 * head_dim;
            const void *qn = (const char *)q + q_at * q_width;
            void *on = (char *)out + q_at * q_width;
            const void *kc = (const char *)k_cache + kv_at * kv_width, *vc = (const char *)v_cache + kv_at * kv_width;
            (void)qn, (void)on, (void)kc, (void)vc, (void)heads; /* read only by the fast paths a build may lack */
            if (k_new != NULL && n < num_write) { /* this step's token is the context's last: write it, then attend */
                const int64_t slot = last_slot(block_table, ctx_lens, n, max_blocks, block_size);
                store_heads(k_cache, slot, k_new, n, row_elems, kv_at, kvh * head_dim, dtype, kv_dtype);
                store_heads(v_cache, slot, v_new, n, row_elems, kv_at, kvh * head_dim, dtype, kv_dtype);
            }
            const int64_t from = ctx_starts != NULL ? ctx_starts[n] : 0;
#ifdef HAVE_BF16_FAST_PATH
            if (path == PATH_BF16) {
                seq_attention_bf16_any((const uint16_t *)qn, (uint16_t *)on, (const uint16_t *)kc, (const uint16_t *)vc,
                                       block_table + n * max_blocks, from, ctx_lens[n], heads, kvh, head_dim, row_elems,
                                       block_size, scale, acc, scores, m, l, 0, -1);
                continue;
            }
#endif
#ifdef __AVX512F__
            if (path == PATH_F32_AVX512) {
                seq_attention_f32_avx512_any((const float *)qn, (float *)on, kc, vc, block_table + n * max_blocks, from,
                                             ctx_lens[n], heads, kvh, head_dim, row_elems, block_size, scale, acc,
                                             scores, m, l, kv_dtype != FUSELM_F32, 0, -1);
                continue;
            }
#endif
#ifdef HAVE_F32_FAST_PATH
            if (path == PATH_F32_AVX2) {
                seq_attention_f32_avx2_any((const float *)qn, (float *)on, kc, vc, block_table + n * max_blocks, from,
                                           ctx_lens[n], heads, kvh, head_dim, row_elems, block_size, scale, acc, scores,
                                           m, l, kv_dtype != FUSELM_F32, 0);
                continue;
            }
#endif
            load_row(q, n, num_heads * head_dim, dtype, qf);
            for (int64_t i = 0; i < num_heads * head_dim; i++) qf[i] *= scale;
            reset_softmax(acc, m, l, num_heads, head_dim);
            const int64_t len = ctx_lens[n];
            for (int64_t b = from / block_size, start = b * block_size; start < len; start += block_size, b++) {
                const int64_t block = block_table[n * max_blocks + b];
                const int64_t count = len - start < block_size ? len - start : block_size;
                const int64_t skip = from > start ? from - start : 0; /* rows before the window's first position */
                for (int64_t t = skip; t < count; t++) {
                    const float *k;
                    if (kv_dtype == FUSELM_F32) {
                        k = (const float *)k_cache + (block * block_size + t) * row_elems;
                    } else {
                        load_row(k_cache, block * block_size + t, row_elems, kv_dtype, row);
                        k = row;
                    }
                    for (int64_t j = 0; j < num_heads; j++) {
                        const float *kh = k + (j / group) * head_dim;
                        const float *qj = qf + j * head_dim;
                        float s = 0.0f;
#pragma omp simd reduction(+ : s)
                        for (int64_t d = 0; d < head_dim; d++) s += qj[d] * kh[d];
                        scores[j * block_size + t] = s;
                    }
                }
                for (int64_t j = 0; j < num_heads; j++) {
                    float *sj = scores + j * block_size;
                    float block_max = sj[skip];
                    for (int64_t t = skip + 1; t < count; t++) block_max = sj[t] > block_max ? sj[t] : block_max;
                    const float new_max = block_max > m[j] ? block_max : m[j];
                    const float correction = exp_nonpositive(m[j] - new_max);
                    float *aj = acc + j * head_dim;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; d++) aj[d] *= correction;
                    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                    for (int64_t t = skip; t < count; t++) {
                        sj[t] = exp_nonpositive(sj[t] - new_max);
                        sum += sj[t];
                    }
                    l[j] = l[j] * correction + sum;
                    m[j] = new_max;
                }
                for (int64_t t = skip; t < count; t++) {
                    const float *v;
                    if (kv_dtype == FUSELM_F32) {
                        v = (const float *)v_cache + (block * block_size + t) * row_elems;
                    } else {
                        load_row(v_cache, block * block_size + t, row_elems, kv_dtype, row);
                        v = row;
                    }
                    for (int64_t j = 0; j < num_heads; j++) {
                        const float *vh = v + (j / group) * head_dim;
                        const float p = scores[j * block_size + t];
                        float *aj = acc + j * head_dim;
#pragma omp simd
                        for (int64_t d = 0; d < head_dim; d++) aj[d] += p * vh[d];
                    }
                }
            }
            for (int64_t j = 0; j < num_heads; j++) {
                const float inv = 1.0f / l[j];
                const int64_t o = (n * num_heads + j) * head_dim;
                if (dtype == FUSELM_F32) {
                    for (int64_t d = 0; d < head_dim; d++) ((float *)out)[o + d] = acc[j * head_dim + d] * inv;
                } else {
                    for (int64_t d = 0; d < head_dim; d++)
                        ((uint16_t *)out)[o + d] = f32_to_bf16(acc[j * head_dim + d] * inv);
                }
            }
        }
        free(qf);
        free(acc);
        free(scores);
        free(m);
        free(l);
        free(row);
    }
}
