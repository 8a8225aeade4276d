/* Paged decode attention over an int8 KV cache (kv_cache_dtype="int8"), and the int8 stores of new
 * K/V rows. The companion of paged_attention.c for the cache layout of fuselm/layers/kv_quant.py:
 *
 *   k/v cache   [num_blocks, block_size, num_kv_heads, head_dim] int8
 *   k/v scale   [num_blocks, block_size, num_kv_heads] bfloat16: row (token, head) ~= int8 * scale
 *
 * The scales stay beside the cache, one per token and head, exactly as the portable path stores
 * them, so both paths read and write the same cache (a prompt chunk written by torch is read
 * here). Decode attention is bound by the bytes it reads: an int8 row of 64 values plus its
 * 2-byte scale is 66 bytes against 256 in float32.
 *
 * Work: OpenMP over sequences; per block and KV head, the block's K and V rows of that head are
 * widened to float (times their scale) once into an L1 scratch, then every query head of the
 * group takes its dot products, online-softmax update and V accumulation from there, in float as
 * the portable path does. The torch path (fuselm/layers/paged_attention.py, dequantise then SDPA)
 * is the reference it is tested against; stores quantise as layers/kv_quant.py does, bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_simd.h"
#include "fuselm_kernels.h"
#include "prefetch_spread.h"

/* x [head_dim] float -> int8 row and bf16 scale: scale = bf16(max(max|x| / 127, 1e-30)),
 * q = clamp(round_half_even(x / scale), -127, 127), as kv_quant.quantize_rows computes it. */
static void quantize_row(const float *x, int64_t head_dim, int8_t *q, uint16_t *scale) {
    float amax = 0.0f;
    for (int64_t d = 0; d < head_dim; d++) amax = fmaxf(amax, fabsf(x[d]));
    float s = amax / 127.0f;
    s = s < 1e-30f ? 1e-30f : s;
    const uint16_t s16 = f32_to_bf16(s);
    const float sf = bf16_to_f32(s16);
    for (int64_t d = 0; d < head_dim; d++) {
        float r = rintf(x[d] / sf);
        r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
        q[d] = (int8_t)r;
    }
    *scale = s16;
}

/* Quantise and store source row `index` ([num_kv_heads, head_dim] in dtype) into cache slot `slot`. */
static void store_row_int8(int8_t *cache, uint16_t *scales, int64_t slot, const void *src, int64_t index,
                           int64_t num_kv_heads, int64_t head_dim, int dtype, float *widened) {
    const int64_t elems = num_kv_heads * head_dim;
    if (dtype == FUSELM_F32) {
        memcpy(widened, (const float *)src + index * elems, sizeof(float) * (size_t)elems);
    } else {
        const uint16_t *s = (const uint16_t *)src + index * elems;
        for (int64_t i = 0; i < elems; i++) widened[i] = bf16_to_f32(s[i]);
    }
    for (int64_t h = 0; h < num_kv_heads; h++)
        quantize_row(widened + h * head_dim, head_dim, cache + slot * elems + h * head_dim, scales + slot * num_kv_heads + h);
}

static inline int64_t context_last_slot(const int64_t *block_table, const int64_t *ctx_lens, int64_t n,
                                        int64_t max_blocks, int64_t block_size) {
    const int64_t pos = ctx_lens[n] - 1;
    return block_table[n * max_blocks + pos / block_size] * block_size + pos % block_size;
}

void fuselm_store_kv_rows_int8(int8_t *k_cache, int8_t *v_cache, uint16_t *k_scale, uint16_t *v_scale,
                               const void *k_new, const void *v_new, int64_t first, int64_t last,
                               const int64_t *block_table, const int64_t *ctx_lens, int64_t max_blocks,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int dtype) {
    float *widened = malloc(sizeof(float) * (size_t)(num_kv_heads * head_dim));
    for (int64_t n = first; n < last; n++) {
        const int64_t slot = context_last_slot(block_table, ctx_lens, n, max_blocks, block_size);
        store_row_int8(k_cache, k_scale, slot, k_new, n, num_kv_heads, head_dim, dtype, widened);
        store_row_int8(v_cache, v_scale, slot, v_new, n, num_kv_heads, head_dim, dtype, widened);
    }
    free(widened);
}

/* rows [count, head_dim] float of KV head h of one block: int8 row times its scale. */
static inline void widen_rows(const int8_t *block_rows, const uint16_t *block_scales, int64_t count, int64_t h,
                              int64_t num_kv_heads, int64_t head_dim, float *rows) {
    const int64_t row_elems = num_kv_heads * head_dim;
    for (int64_t t = 0; t < count; t++) {
        const int8_t *src = block_rows + t * row_elems + h * head_dim;
        const float s = bf16_to_f32(block_scales[t * num_kv_heads + h]);
        float *dst = rows + t * head_dim;
        int64_t d = 0;
#if defined(__AVX512F__)
        for (; d + 16 <= head_dim; d += 16) {
            const __m512i wide = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + d)));
            _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_cvtepi32_ps(wide), _mm512_set1_ps(s)));
        }
#endif
        for (; d < head_dim; d++) dst[d] = (float)src[d] * s;
    }
}

/* scores[t] = scale * q . keys[t] for t < count (keys [count, head_dim] float). */
static inline void block_scores(const float *q, const float *keys, int64_t count, int64_t head_dim, float scale,
                                float *scores) {
    int64_t t0 = 0;
#if defined(__AVX512F__)
    if (head_dim % 16 == 0 && head_dim <= 256) {
        __m512 qv[16];
        for (int64_t c = 0; c < head_dim / 16; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
        for (; t0 + 16 <= count; t0 += 16) { /* 16 keys' dot products reduced by one shuffle tree */
            __m512 part[16];
            for (int64_t t = 0; t < 16; t++) {
                const float *k = keys + (t0 + t) * head_dim;
                __m512 s = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
                for (int64_t c = 1; c < head_dim / 16; c++) s = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), s);
                part[t] = s;
            }
            _mm512_storeu_ps(scores + t0, _mm512_mul_ps(hsum16(part), _mm512_set1_ps(scale)));
        }
    }
#endif
    for (int64_t t = t0; t < count; t++) {
        const float *k = keys + t * head_dim;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < head_dim; d++) s += q[d] * k[d];
        scores[t] = s * scale;
    }
}

/* One query head's online-softmax step over a block: scores become probabilities relative to the
 * new running max, acc [head_dim] is rescaled and gains sum_t p[t] * values[t]. */
static inline void block_update(float *scores, const float *values, int64_t count, int64_t head_dim, float *acc,
                                float *m, float *l) {
    float block_max = scores[0];
    for (int64_t t = 1; t < count; t++) block_max = scores[t] > block_max ? scores[t] : block_max;
    const float new_max = block_max > *m ? block_max : *m;
    const float correction = expf(*m - new_max);
    float sum = 0.0f;
    int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; t + 8 <= count; t += 8) {
        const __m256 e = exp256_clamped(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(new_max)));
        _mm256_storeu_ps(scores + t, e);
    }
#endif
    for (; t < count; t++) scores[t] = expf(scores[t] - new_max);
    for (t = 0; t < count; t++) sum += scores[t];
    *l = *l * correction + sum;
    *m = new_max;
#if defined(__AVX512F__)
    if (head_dim % 16 == 0 && head_dim <= 256) {
        __m512 a[16];
        for (int64_t c = 0; c < head_dim / 16; c++) a[c] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), _mm512_set1_ps(correction));
        for (t = 0; t < count; t++) {
            const __m512 p = _mm512_set1_ps(scores[t]);
            const float *v = values + t * head_dim;
            for (int64_t c = 0; c < head_dim / 16; c++) a[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16 * c), a[c]);
        }
        for (int64_t c = 0; c < head_dim / 16; c++) _mm512_storeu_ps(acc + 16 * c, a[c]);
        return;
    }
#endif
    for (int64_t d = 0; d < head_dim; d++) acc[d] *= correction;
    for (t = 0; t < count; t++) {
        const float p = scores[t];
        const float *v = values + t * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; d++) acc[d] += p * v[d];
    }
}

/* As fuselm_paged_decode_attention, over an int8 cache with its scales: q, out and k_new/v_new in
 * dtype (FUSELM_F32 or FUSELM_BF16); the first num_write rows' new K/V are quantised into their
 * slots before they are read. */
void fuselm_paged_decode_attention_int8(const void *q, void *out, int8_t *k_cache, int8_t *v_cache, uint16_t *k_scale,
                                        uint16_t *v_scale, const void *k_new, const void *v_new, int64_t num_write,
                                        const int64_t *block_table, const int64_t *ctx_lens, int64_t num_seqs,
                                        int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                        int64_t block_size, float scale, int dtype, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t row_elems = num_kv_heads * head_dim;
#pragma omp parallel num_threads(num_threads)
    {
        float *qf = malloc(sizeof(float) * (size_t)(num_heads * head_dim));
        float *acc = malloc(sizeof(float) * (size_t)(num_heads * head_dim));
        float *m = malloc(sizeof(float) * (size_t)num_heads);
        float *l = malloc(sizeof(float) * (size_t)num_heads);
        float *scores = malloc(sizeof(float) * (size_t)block_size);
        float *keys = malloc(sizeof(float) * (size_t)(block_size * head_dim));
        float *values = malloc(sizeof(float) * (size_t)(block_size * head_dim));
        float *widened = malloc(sizeof(float) * (size_t)row_elems);
#pragma omp for schedule(dynamic, 1)
        for (int64_t n = 0; n < num_seqs; n++) {
            if (k_new != NULL && n < num_write) {
                const int64_t slot = context_last_slot(block_table, ctx_lens, n, max_blocks, block_size);
                store_row_int8(k_cache, k_scale, slot, k_new, n, num_kv_heads, head_dim, dtype, widened);
                store_row_int8(v_cache, v_scale, slot, v_new, n, num_kv_heads, head_dim, dtype, widened);
            }
            const int64_t q_elems = num_heads * head_dim;
            if (dtype == FUSELM_F32) {
                memcpy(qf, (const float *)q + n * q_elems, sizeof(float) * (size_t)q_elems);
            } else {
                for (int64_t i = 0; i < q_elems; i++) qf[i] = bf16_to_f32(((const uint16_t *)q)[n * q_elems + i]);
            }
            for (int64_t i = 0; i < q_elems; i++) acc[i] = 0.0f;
            for (int64_t j = 0; j < num_heads; j++) m[j] = -INFINITY, l[j] = 0.0f;
            const int64_t *table = block_table + n * max_blocks;
            const int64_t len = ctx_lens[n];
            for (int64_t start = 0, b = 0; start < len; start += block_size, b++) {
                const int64_t block = table[b];
                const int64_t count = len - start < block_size ? len - start : block_size;
                const int8_t *kb = k_cache + block * block_size * row_elems;
                const int8_t *vb = v_cache + block * block_size * row_elems;
                const uint16_t *ksb = k_scale + block * block_size * num_kv_heads;
                const uint16_t *vsb = v_scale + block * block_size * num_kv_heads;
                /* Blocks sit anywhere in the pool: fetch the next one's rows while this one is computed, a share
                 * of its K and V lines before each query head (prefetch_spread.h: a burst of the whole block
                 * keeps fewer misses in flight), its scales with the first. */
                const char *next_k = NULL, *next_v = NULL;
                const int64_t lines = block_size * row_elems / 64;
                if (start + block_size < len) {
                    const int64_t next = table[b + 1];
                    next_k = (const char *)(k_cache + next * block_size * row_elems);
                    next_v = (const char *)(v_cache + next * block_size * row_elems);
                    __builtin_prefetch(k_scale + next * block_size * num_kv_heads);
                    __builtin_prefetch(v_scale + next * block_size * num_kv_heads);
                }
                for (int64_t h = 0; h < num_kv_heads; h++) {
                    widen_rows(kb, ksb, count, h, num_kv_heads, head_dim, keys);
                    widen_rows(vb, vsb, count, h, num_kv_heads, head_dim, values);
                    for (int64_t j = h * group; j < (h + 1) * group; j++) {
                        const PrefetchShare pk = prefetch_share(next_k, lines, j, num_heads, 1);
                        const PrefetchShare pv = prefetch_share(next_v, lines, j, num_heads, 1);
                        prefetch_step(&pk, 0);
                        prefetch_step(&pv, 0);
                        block_scores(qf + j * head_dim, keys, count, head_dim, scale, scores);
                        block_update(scores, values, count, head_dim, acc + j * head_dim, m + j, l + j);
                    }
                }
            }
            for (int64_t j = 0; j < num_heads; j++) {
                const float inv = 1.0f / l[j];
                const int64_t o = (n * num_heads + j) * head_dim;
                for (int64_t d = 0; d < head_dim; d++) {
                    const float value = acc[j * head_dim + d] * inv;
                    if (dtype == FUSELM_F32)
                        ((float *)out)[o + d] = value;
                    else
                        ((uint16_t *)out)[o + d] = f32_to_bf16(value);
                }
            }
        }
        free(qf), free(acc), free(m), free(l), free(scores), free(keys), free(values), free(widened);
    }
}
