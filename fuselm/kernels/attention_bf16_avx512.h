/* Decode attention of one sequence for bfloat16 queries over a bfloat16 cache with AVX-512-BF16 (vdpbf16ps): the
 * per-row kernel of paged_attention.c, and of the shared-prefix kernel's own blocks (cascade_attention.c). */
#ifndef FUSELM_ATTENTION_BF16_AVX512_H
#define FUSELM_ATTENTION_BF16_AVX512_H
#include <math.h>
#include <stdint.h>

#include "bf16_simd.h"
#include "prefetch_spread.h"
#include "softmax_exp.h"

#ifndef MAX_DIM
#define MAX_DIM 256
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__) /* immintrin.h comes with bf16_simd.h */
#define HAVE_BF16_FAST_PATH 1

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

/* One sequence, bf16 queries and bf16 cache, head_dim % 32 == 0, block_size % 16 == 0.
 * q . k with vdpbf16ps (bf16 products, float accumulation), 16 keys reduced at once by hsum16;
 * the softmax and the V accumulation in float, as in the portable path. acc [num_heads, head_dim],
 * scores [num_heads, block_size], m and l [num_heads] are scratch; with `resume` they hold an online-softmax
 * state of the positions before `from` (a block start) to continue from, as attention_f32_avx512.h's row kernel
 * (the shared-prefix kernel's own blocks). after: the pool block to ask for during the last block, or -1. */
static inline __attribute__((always_inline)) void seq_attention_bf16(const uint16_t *q, uint16_t *out, const uint16_t *k_cache, const uint16_t *v_cache,
                               const int64_t *table, int64_t from, int64_t len, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t row_elems, int64_t block_size, float scale, float *acc,
                               float *scores, float *m, float *l, int resume, int64_t after) {
    const int64_t group = num_heads / num_kv_heads;
    for (int64_t j = 0; j < num_heads && !resume; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
        for (int64_t d = 0; d < head_dim; d++) acc[j * head_dim + d] = 0.0f;
    }
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t b = from / block_size, start = b * block_size; start < len; start += block_size, b++) {
        const int64_t block = table[b];
        const int64_t count = len - start < block_size ? len - start : block_size;
        const int64_t skip = from > start ? from - start : 0; /* rows before the window's first position */
        const uint16_t *kb = k_cache + block * block_size * row_elems;
        const uint16_t *vb = v_cache + block * block_size * row_elems;
        /* Blocks sit anywhere in the pool, so the hardware prefetcher cannot run ahead across them
         * (measured: 8 GB/s with shuffled blocks vs 20+ in order); fetch the next block (one ahead: 1-4
         * measured, 1 is best) while this one is computed: its K lines during the scores (a step per 4
         * keys of a head), its V lines a share per head during that head's V sums, a few lines at a time
         * (prefetch_spread.h). Only a full block has a next one. */
        const int64_t lines = block_size * row_elems * 2 / 64;
        const char *next_k = NULL, *next_v = NULL;
        const int64_t next = start + block_size < len ? table[b + 1] : after;
        if (next >= 0) {
            next_k = (const char *)(k_cache + next * block_size * row_elems);
            next_v = (const char *)(v_cache + next * block_size * row_elems);
        }
        const PrefetchShare pk = prefetch_share(next_k, lines, 0, 1, block_size / 4 * num_heads);
        for (int64_t t0 = 0; t0 < count; t0 += 16) {
            const int64_t tn = count - t0 < 16 ? count - t0 : 16;
            for (int64_t j = 0; j < num_heads; j++) {
                const uint16_t *qj = q + j * head_dim;
                const uint16_t *kh = kb + t0 * row_elems + (j / group) * head_dim;
                __m512 part[16];
                for (int64_t t = 0; t < 16; t++) {
                    if (t % 4 == 0) prefetch_step(&pk, (t0 / 16 * num_heads + j) * 4 + t / 4);
                    __m512 s = _mm512_setzero_ps();
                    if (t < tn) {
                        for (int64_t d = 0; d < head_dim; d += 32)
                            s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(qj + d),
                                                 (__m512bh)_mm512_loadu_si512(kh + t * row_elems + d));
                    }
                    part[t] = s;
                }
                _mm512_storeu_ps(scores + j * block_size + t0, _mm512_mul_ps(hsum16(part), vscale));
            }
        }
        /* Per query head: the online-softmax update on 16 scores at a time, then V accumulated into
         * registers (head_dim is a constant where this is inlined for 64 and 128, so the loops
         * unroll), two tokens at a time into two sets of accumulators to keep the FMA chains short. */
        for (int64_t j = 0; j < num_heads; j++) {
            float *sj = scores + j * block_size;
            const float correction = softmax_block_update16(sj, count, skip, &m[j], &l[j]);

            const PrefetchShare pv = prefetch_share(next_v, lines, j, num_heads, (count - skip + 1) / 2);
            const uint16_t *vh = vb + (j / group) * head_dim;
            float *aj = acc + j * head_dim;
            const __m512 vcorr = _mm512_set1_ps(correction);
            __m512 a[MAX_DIM / 16], a2[MAX_DIM / 16];
            for (int64_t c = 0; c < head_dim / 16; c++) {
                a[c] = _mm512_mul_ps(_mm512_loadu_ps(aj + 16 * c), vcorr);
                a2[c] = _mm512_setzero_ps();
            }
            int64_t t = skip;
            for (; t + 1 < count; t += 2) {
                const __m512 p0 = _mm512_set1_ps(sj[t]), p1 = _mm512_set1_ps(sj[t + 1]);
                prefetch_step(&pv, (t - skip) / 2);
                for (int64_t c = 0; c < head_dim / 16; c++) {
                    a[c] = _mm512_fmadd_ps(p0, bf16x16_to_f32(vh + t * row_elems + 16 * c), a[c]);
                    a2[c] = _mm512_fmadd_ps(p1, bf16x16_to_f32(vh + (t + 1) * row_elems + 16 * c), a2[c]);
                }
            }
            if (t < count) {
                const __m512 p0 = _mm512_set1_ps(sj[t]);
                prefetch_step(&pv, (t - skip) / 2);
                for (int64_t c = 0; c < head_dim / 16; c++)
                    a[c] = _mm512_fmadd_ps(p0, bf16x16_to_f32(vh + t * row_elems + 16 * c), a[c]);
            }
            for (int64_t c = 0; c < head_dim / 16; c++) _mm512_storeu_ps(aj + 16 * c, _mm512_add_ps(a[c], a2[c]));
        }
    }
    for (int64_t j = 0; j < num_heads; j++) {
        const float inv = 1.0f / l[j];
        for (int64_t d = 0; d < head_dim; d++) out[j * head_dim + d] = f32_to_bf16(acc[j * head_dim + d] * inv);
    }
}

/* seq_attention_bf16 with the head size a constant where it is 64 or 128 (unrolled loops, V in registers). */
static inline void seq_attention_bf16_any(const uint16_t *q, uint16_t *out, const uint16_t *k_cache,
                                          const uint16_t *v_cache, const int64_t *table, int64_t from, int64_t len,
                                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t row_elems,
                                          int64_t block_size, float scale, float *acc, float *scores, float *m, float *l,
                                          int resume, int64_t after) {
#define SEQ_BF16(D)                                                                                             \
    seq_attention_bf16(q, out, k_cache, v_cache, table, from, len, num_heads, num_kv_heads, D, row_elems, block_size, \
                       scale, acc, scores, m, l, resume, after)
    if (head_dim == 64)
        SEQ_BF16(64);
    else if (head_dim == 128)
        SEQ_BF16(128);
    else
        SEQ_BF16(head_dim);
#undef SEQ_BF16
}
#endif

#endif
