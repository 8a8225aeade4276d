/* Decode attention of one sequence for float32 queries in 256-bit registers (AVX2 and FMA): paged_attention.c's
 * float32 path on AVX2 builds, and the per-row part of the shared-prefix kernel there (cascade_attention.c: a
 * row's own blocks past its group's shared ones, resumed from the merged state). attention_f32_avx512.h is its
 * AVX-512 counterpart.
 *
 * The arithmetic order depends only on the row's own context (never on the batch), so a sequence gets the same
 * output at any batch size or row position, as the speculative verification needs.
 */
#ifndef FUSELM_ATTENTION_F32_AVX2_H
#define FUSELM_ATTENTION_F32_AVX2_H
#if defined(__AVX2__) && defined(__FMA__)
#include <math.h>
#include <stdint.h>

#include "bf16_simd.h" /* immintrin.h, exp256_clamped */
#include "prefetch_spread.h"
#include "softmax_exp.h"

#define HAVE_F32_FAST_PATH 1
#define F32_AVX2_MAX_DIM 256

/* Lane sums of 8 vectors, in order: result lane t = sum of v[t]'s 8 lanes. */
static inline __m256 hsum8(const __m256 *v) {
    const __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3); /* per 128-bit half */
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

/* All-ones in lanes 0 .. n-1 (n may exceed 8). */
static inline __m256 lanes_before(int64_t n) {
    return _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)(n < 8 ? n : 8)), _CMP_LT_OQ);
}

/* All-ones in lanes lo .. hi-1 (either bound may lie outside 0 .. 8). */
static inline __m256 lanes_between(int64_t lo, int64_t hi) {
    const __m256 index = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const float first = (float)(lo < 0 ? 0 : lo > 8 ? 8 : lo);
    return _mm256_and_ps(_mm256_cmp_ps(index, _mm256_set1_ps(first), _CMP_GE_OQ), lanes_before(hi));
}

static inline float hsum_one(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

static inline float hmax8(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

/* 8 cache values as floats: a float32 cache is read as is, a bfloat16 one widened in registers. */
static inline __m256 kv8(const void *base, int64_t index, int kv_bf16) {
    if (!kv_bf16) return _mm256_loadu_ps((const float *)base + index);
    const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + index));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

/* One sequence, float32 queries over a float32 (kv_bf16 = 0) or bfloat16 cache; head_dim % 8 == 0,
 * block_size % 8 == 0, head_dim <= F32_AVX2_MAX_DIM; positions from .. len - 1 through `table`, whose rows
 * are row_elems apart. The portable loop of paged_attention.c reduced every q . k on its own and let the
 * hardware prefetcher find each scattered block (10 GB/s on a 2-core Zen 3 EPYC, 128 x 300 tokens); this
 * path prefetches the next block while computing the current one, takes the dot products of 8 keys at a
 * time with one 8-vector lane-sum tree, and keeps each head's V accumulator in registers.
 * acc [num_heads, head_dim], scores [num_heads, block_size], m and l [num_heads] are scratch; with `resume`
 * they hold an online-softmax state (running max, sum, unnormalised output, in scaled-score units) of the
 * positions before `from`, which must then start a block, and the row continues from it (the shared-prefix
 * kernel's own blocks, cascade_attention.c). */
static inline __attribute__((always_inline)) void seq_attention_f32_avx2(
    const float *q, float *out, const void *k_cache, const void *v_cache, const int64_t *table, int64_t from, int64_t len,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t row_elems, int64_t block_size, float scale,
    float *acc, float *scores, float *m, float *l, int kv_bf16, int resume, int head_subset) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t width = kv_bf16 ? 2 : 4;
    if (!resume) reset_softmax(acc, m, l, num_heads, head_dim);
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int64_t b = from / block_size, start = b * block_size; start < len; start += block_size, b++) {
        const int64_t block = table[b];
        const int64_t count = len - start < block_size ? len - start : block_size;
        const int64_t skip = from > start ? from - start : 0; /* rows before the window's first position */
        const int64_t base = block * block_size * row_elems; /* element index of the block's first row */
        /* The next block sits anywhere in the pool, so the hardware prefetcher cannot run ahead: fetch it
         * while this one is computed, its K lines a share per head during that head's scores (a step per 8
         * keys and 8 dimensions), its V lines during that head's V sums (a step per key), a line or two at
         * a time (prefetch_spread.h; all at once overflows the miss queues: 13 GB/s vs 30 for a plain read,
         * 128 x 300 tokens on a 2-core Zen 3 EPYC). Only a full block has a next one. */
        const int64_t bytes = block_size * row_elems * width;
        const int64_t chunks = head_dim / 8;
        const int64_t item_lines = num_kv_heads * head_dim * width / 64, row_stride = row_elems * width / 64;
        const char *next_k = NULL, *next_v = NULL;
        if (start + block_size < len) {
            next_k = (const char *)k_cache + table[b + 1] * bytes;
            next_v = (const char *)v_cache + table[b + 1] * bytes;
        }
        for (int64_t j = 0; j < num_heads; j++) {
            const float *qj = q + j * head_dim;
            const int64_t head_off = base + (j / group) * head_dim;
            const PrefetchShare pk = prefetch_item_share(next_k, head_subset, block_size, item_lines, row_stride,
                                                         bytes / 64, j, num_heads, block_size / 8 * chunks);
            __m256 qv[F32_AVX2_MAX_DIM / 8];
            for (int64_t c = 0; c < chunks; c++) qv[c] = _mm256_loadu_ps(qj + 8 * c);
            for (int64_t t0 = 0; t0 < count; t0 += 8) { /* rows past count are in the block: read, never used */
                __m256 part[8];
                prefetch_item_step(&pk, head_subset, t0 / 8 * chunks);
                for (int64_t t = 0; t < 8; t++) part[t] = _mm256_mul_ps(qv[0], kv8(k_cache, head_off + (t0 + t) * row_elems, kv_bf16));
                for (int64_t c = 1; c < chunks; c++) {
                    prefetch_item_step(&pk, head_subset, t0 / 8 * chunks + c);
                    for (int64_t t = 0; t < 8; t++)
                        part[t] = _mm256_fmadd_ps(qv[c], kv8(k_cache, head_off + (t0 + t) * row_elems + 8 * c, kv_bf16), part[t]);
                }
                _mm256_storeu_ps(scores + j * block_size + t0, _mm256_mul_ps(hsum8(part), vscale));
            }
        }
        for (int64_t j = 0; j < num_heads; j++) {
            float *sj = scores + j * block_size;
            /* lanes past count (rows the block holds but the context does not reach, maybe NaN) are masked out */
            __m256 vmax = _mm256_set1_ps(-INFINITY);
            for (int64_t t0 = 0; t0 < count; t0 += 8)
                vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(sj + t0),
                                                            lanes_between(skip - t0, count - t0)));
            const float block_max = hmax8(vmax);
            const float new_max = block_max > m[j] ? block_max : m[j];
            const float correction = exp_nonpositive(m[j] - new_max);
            const __m256 vnew = _mm256_set1_ps(new_max);
            __m256 vsum = _mm256_setzero_ps();
            for (int64_t t0 = 0; t0 < count; t0 += 8) {
                const __m256 e = _mm256_and_ps(exp256_clamped(_mm256_sub_ps(_mm256_loadu_ps(sj + t0), vnew)),
                                               lanes_between(skip - t0, count - t0));
                _mm256_storeu_ps(sj + t0, e);
                vsum = _mm256_add_ps(vsum, e);
            }
            l[j] = l[j] * correction + hsum_one(vsum);
            m[j] = new_max;

            const PrefetchShare pv = prefetch_item_share(next_v, head_subset, block_size, item_lines, row_stride,
                                                         bytes / 64, j, num_heads, count - skip);
            const int64_t head_off = base + (j / group) * head_dim;
            float *aj = acc + j * head_dim;
            const __m256 vcorr = _mm256_set1_ps(correction);
            __m256 a[F32_AVX2_MAX_DIM / 8];
            for (int64_t c = 0; c < head_dim / 8; c++) a[c] = _mm256_mul_ps(_mm256_loadu_ps(aj + 8 * c), vcorr);
            for (int64_t t = skip; t < count; t++) {
                const __m256 p = _mm256_set1_ps(sj[t]);
                const int64_t row = head_off + t * row_elems;
                prefetch_item_step(&pv, head_subset, t - skip);
                for (int64_t c = 0; c < head_dim / 8; c++) a[c] = _mm256_fmadd_ps(p, kv8(v_cache, row + 8 * c, kv_bf16), a[c]);
            }
            for (int64_t c = 0; c < head_dim / 8; c++) _mm256_storeu_ps(aj + 8 * c, a[c]);
        }
    }
    for (int64_t j = 0; j < num_heads; j++) {
        const __m256 inv = _mm256_set1_ps(1.0f / l[j]);
        for (int64_t d = 0; d < head_dim; d += 8)
            _mm256_storeu_ps(out + j * head_dim + d, _mm256_mul_ps(_mm256_loadu_ps(acc + j * head_dim + d), inv));
    }
}

/* seq_attention_f32_avx2 with the head size and cache type as constants where they are the common ones (64 or
 * 128, float32 or bfloat16 cache), so the compiler unrolls the head_dim loops and keeps V in registers. */
static inline void seq_attention_f32_avx2_any(const float *q, float *out, const void *k_cache, const void *v_cache,
                                              const int64_t *table, int64_t from, int64_t len, int64_t num_heads,
                                              int64_t num_kv_heads, int64_t head_dim, int64_t row_elems,
                                              int64_t block_size, float scale, float *acc, float *scores, float *m,
                                              float *l, int kv_bf16, int resume) {
    const int64_t width = kv_bf16 ? 2 : 4;
    const int subset = prefetch_own_rows(num_kv_heads * head_dim * width, row_elems * width, k_cache, v_cache);
#define SEQ_F32_AVX2(D, BF16)                                                                                       \
    (subset ? seq_attention_f32_avx2(q, out, k_cache, v_cache, table, from, len, num_heads, num_kv_heads, D,      \
                                     row_elems, block_size, scale, acc, scores, m, l, BF16, resume, 1)             \
            : seq_attention_f32_avx2(q, out, k_cache, v_cache, table, from, len, num_heads, num_kv_heads, D,      \
                                     row_elems, block_size, scale, acc, scores, m, l, BF16, resume, 0))
    if (head_dim == 64 && !kv_bf16)
        SEQ_F32_AVX2(64, 0);
    else if (head_dim == 64)
        SEQ_F32_AVX2(64, 1);
    else if (head_dim == 128 && !kv_bf16)
        SEQ_F32_AVX2(128, 0);
    else if (!kv_bf16)
        SEQ_F32_AVX2(head_dim, 0);
    else
        SEQ_F32_AVX2(head_dim, 1);
#undef SEQ_F32_AVX2
}
#endif
#endif
