/* Decode attention of one sequence for float32 queries in 512-bit registers: the AVX-512 variant of
 * paged_attention.c's AVX2 float32 path, which the AVX-512 builds used as is (8 keys per lane-sum
 * tree, 8-float V accumulators) while their GEMM moved to zmm. Here q . k takes 16 keys at a time
 * into one hsum16 tree, the online-softmax update runs on 16 scores with masked lanes, and each
 * head's V accumulator lives in head_dim / 16 zmm registers, two tokens at a time into two sets
 * (short FMA chains). The cache may be float32 or bfloat16 (widened in registers).
 *
 * The arithmetic order depends only on the row's own context (never on the batch), so a sequence
 * gets the same output at any batch size or row position, as the speculative verification needs.
 * Included by paged_attention.c where the compiler targets AVX-512F.
 */
#ifndef FUSELM_ATTENTION_F32_AVX512_H
#define FUSELM_ATTENTION_F32_AVX512_H
#if defined(__AVX512F__)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "bf16_simd.h"
#include "prefetch_spread.h"
#include "softmax_exp.h"

#define F32_AVX512_MAX_DIM 256

/* 16 cache values as floats: a float32 cache read as is, a bfloat16 one widened. */
static inline __m512 kv16(const void *base, int64_t index, int kv_bf16) {
    if (!kv_bf16) return _mm512_loadu_ps((const float *)base + index);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

/* One sequence: q, out [num_heads, head_dim] float32; positions from .. len - 1 of the paged cache
 * through `table`, whose rows are row_elems apart (num_kv_heads * head_dim, or more where these heads are
 * part of a row: the caches then point at the first one); head_dim % 16 == 0, block_size % 16 == 0,
 * head_dim <= F32_AVX512_MAX_DIM.
 * acc [num_heads, head_dim], scores [num_heads, block_size], m and l [num_heads] are scratch; with `resume`
 * they hold an online-softmax state (running max, sum, unnormalised output, in scaled-score units) of the
 * positions before `from`, which must then start a block, and the row continues from it (the shared-prefix
 * kernel's own blocks, cascade_attention.c). after: the pool block whose lines to ask for during the last block
 * (the first block of the row the caller takes next), or -1. */
static inline __attribute__((always_inline)) void seq_attention_f32_avx512(
    const float *q, float *out, const void *k_cache, const void *v_cache, const int64_t *table, int64_t from, int64_t len,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t row_elems, int64_t block_size, float scale,
    float *acc, float *scores, float *m, float *l, int kv_bf16, int resume, int64_t after, int head_subset) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t width = kv_bf16 ? 2 : 4;
    const int64_t bytes = block_size * row_elems * width;
    /* with head_subset (these heads are part of a row), the item asks only for its own heads' lines of each row */
    const int64_t item_lines = num_kv_heads * head_dim * width / 64, row_stride = row_elems * width / 64;
    const int64_t chunks = head_dim / 16;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < num_heads && !resume; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
        for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(acc + j * head_dim + 16 * c, _mm512_setzero_ps());
    }
    for (int64_t b = from / block_size, start = b * block_size; start < len; start += block_size, b++) {
        const int64_t count = len - start < block_size ? len - start : block_size;
        const int64_t skip = from > start ? from - start : 0; /* rows before the window's first position */
        const int64_t base = table[b] * block_size * row_elems;
        /* The next block, one ahead (2 or 3 ahead, or into L1, measured the same): its K lines a share per
         * head during that head's scores, its V lines during that head's V sums, a line or two per token
         * (prefetch_spread.h). Only a full block has a next one, so count == block_size then. */
        const char *next_k = NULL, *next_v = NULL;
        const int64_t next = start + block_size < len ? table[b + 1] : after;
        if (next >= 0) {
            next_k = (const char *)k_cache + next * bytes;
            next_v = (const char *)v_cache + next * bytes;
        }
        for (int64_t j = 0; j < num_heads; j++) {
            const int64_t head_off = base + (j / group) * head_dim;
            /* a step per 16 keys and 16 dimensions: between the unrolled loops, where the 16 partial sums stay in registers */
            const PrefetchShare pk = prefetch_item_share(next_k, head_subset, block_size, item_lines, row_stride,
                                                         bytes / 64, j, num_heads, block_size / 16 * chunks);
            __m512 qv[F32_AVX512_MAX_DIM / 16];
            for (int64_t c = 0; c < chunks; c++) qv[c] = _mm512_loadu_ps(q + j * head_dim + 16 * c);
            for (int64_t t0 = 0; t0 < count; t0 += 16) { /* rows past count are in the block: read, never used */
                __m512 part[16];
                prefetch_item_step(&pk, head_subset, t0 / 16 * chunks);
                for (int64_t t = 0; t < 16; t++) part[t] = _mm512_mul_ps(qv[0], kv16(k_cache, head_off + (t0 + t) * row_elems, kv_bf16));
                for (int64_t c = 1; c < chunks; c++) {
                    prefetch_item_step(&pk, head_subset, t0 / 16 * chunks + c);
                    for (int64_t t = 0; t < 16; t++)
                        part[t] = _mm512_fmadd_ps(qv[c], kv16(k_cache, head_off + (t0 + t) * row_elems + 16 * c, kv_bf16), part[t]);
                }
                _mm512_storeu_ps(scores + j * block_size + t0, _mm512_mul_ps(hsum16(part), vscale));
            }
        }
        for (int64_t j = 0; j < num_heads; j++) {
            float *sj = scores + j * block_size;
            const float correction = softmax_block_update16(sj, count, skip, &m[j], &l[j]);

            const PrefetchShare pv = prefetch_item_share(next_v, head_subset, block_size, item_lines, row_stride,
                                                         bytes / 64, j, num_heads, (count - skip + 1) / 2);
            const int64_t head_off = base + (j / group) * head_dim;
            float *aj = acc + j * head_dim;
            const __m512 vcorr = _mm512_set1_ps(correction);
            __m512 a[F32_AVX512_MAX_DIM / 16], a2[F32_AVX512_MAX_DIM / 16];
            for (int64_t c = 0; c < chunks; c++) {
                a[c] = _mm512_mul_ps(_mm512_loadu_ps(aj + 16 * c), vcorr);
                a2[c] = _mm512_setzero_ps();
            }
            int64_t t = skip;
            for (; t + 1 < count; t += 2) {
                const __m512 p0 = _mm512_set1_ps(sj[t]), p1 = _mm512_set1_ps(sj[t + 1]);
                const int64_t row = head_off + t * row_elems;
                prefetch_item_step(&pv, head_subset, (t - skip) / 2);
                for (int64_t c = 0; c < chunks; c++) {
                    a[c] = _mm512_fmadd_ps(p0, kv16(v_cache, row + 16 * c, kv_bf16), a[c]);
                    a2[c] = _mm512_fmadd_ps(p1, kv16(v_cache, row + row_elems + 16 * c, kv_bf16), a2[c]);
                }
            }
            if (t < count) {
                const __m512 p0 = _mm512_set1_ps(sj[t]);
                prefetch_item_step(&pv, head_subset, (t - skip) / 2);
                for (int64_t c = 0; c < chunks; c++) a[c] = _mm512_fmadd_ps(p0, kv16(v_cache, head_off + t * row_elems + 16 * c, kv_bf16), a[c]);
            }
            for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(aj + 16 * c, _mm512_add_ps(a[c], a2[c]));
        }
    }
    for (int64_t j = 0; j < num_heads; j++) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[j]);
        for (int64_t c = 0; c < chunks; c++)
            _mm512_storeu_ps(out + j * head_dim + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(acc + j * head_dim + 16 * c), inv));
    }
}

/* seq_attention_f32_avx512 with the head size and cache type as constants where they are the common ones (64 or
 * 128, float32 or bfloat16 cache), so the compiler unrolls the head_dim loops and keeps V in registers. */
static inline void seq_attention_f32_avx512_any(const float *q, float *out, const void *k_cache, const void *v_cache,
                                                const int64_t *table, int64_t from, int64_t len, int64_t num_heads,
                                                int64_t num_kv_heads, int64_t head_dim, int64_t row_elems,
                                                int64_t block_size, float scale, float *acc, float *scores, float *m,
                                                float *l, int kv_bf16, int resume, int64_t after) {
    const int64_t width = kv_bf16 ? 2 : 4;
    const int subset = prefetch_own_rows(num_kv_heads * head_dim * width, row_elems * width, k_cache, v_cache);
#define SEQ_F32(D, BF16)                                                                                            \
    (subset ? seq_attention_f32_avx512(q, out, k_cache, v_cache, table, from, len, num_heads, num_kv_heads, D,      \
                                       row_elems, block_size, scale, acc, scores, m, l, BF16, resume, after, 1)     \
            : seq_attention_f32_avx512(q, out, k_cache, v_cache, table, from, len, num_heads, num_kv_heads, D,      \
                                       row_elems, block_size, scale, acc, scores, m, l, BF16, resume, after, 0))
    if (head_dim == 64 && !kv_bf16)
        SEQ_F32(64, 0);
    else if (head_dim == 64)
        SEQ_F32(64, 1);
    else if (head_dim == 128 && !kv_bf16)
        SEQ_F32(128, 0);
    else if (!kv_bf16)
        SEQ_F32(head_dim, 0);
    else
        SEQ_F32(head_dim, 1);
#undef SEQ_F32
}
#endif
#endif
