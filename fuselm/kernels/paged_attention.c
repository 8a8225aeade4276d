/* Paged decode attention for CPU: one query token per sequence, keys/values read in place from the
 * block-paged cache (no gather copy), online softmax, float accumulation, OpenMP over
 * (sequence, kv head). Built at run time by fuselm/kernels/cpu.py; the torch path in
 * fuselm/runner/attention.py is the reference it is tested against.
 *
 * Layouts (all contiguous):
 *   q, out      [num_seqs, num_heads, head_dim]
 *   k/v cache   [num_blocks, block_size, num_kv_heads, head_dim]
 *   block_table [num_seqs, max_blocks] int64, ctx_lens [num_seqs] int64
 * dtype: 0 = float32, 1 = bfloat16 (q, out and the caches share it).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_DIM 256
#define MAX_BLOCK 64

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline void load_row(const void *base, int64_t index, int64_t dim, int dtype, float *dst) {
    if (dtype == 0) {
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

void fuselm_paged_decode_attention(const void *q, void *out, const void *k_cache, const void *v_cache,
                                   const int64_t *block_table, const int64_t *ctx_lens, int64_t num_seqs,
                                   int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                   int64_t block_size, float scale, int dtype, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t n = 0; n < num_seqs; n++) {
        for (int64_t h = 0; h < num_kv_heads; h++) {
            float qf[MAX_GROUP][MAX_DIM], acc[MAX_GROUP][MAX_DIM];
            float scores[MAX_GROUP][MAX_BLOCK], row[MAX_DIM];
            float m[MAX_GROUP], l[MAX_GROUP];
            for (int64_t g = 0; g < group; g++) {
                load_row(q, n * num_heads + h * group + g, head_dim, dtype, qf[g]);
                for (int64_t d = 0; d < head_dim; d++) {
                    qf[g][d] *= scale;
                    acc[g][d] = 0.0f;
                }
                m[g] = -INFINITY;
                l[g] = 0.0f;
            }
            const int64_t len = ctx_lens[n];
            for (int64_t start = 0, b = 0; start < len; start += block_size, b++) {
                const int64_t block = block_table[n * max_blocks + b];
                const int64_t count = len - start < block_size ? len - start : block_size;
                for (int64_t t = 0; t < count; t++) {
                    load_row(k_cache, (block * block_size + t) * num_kv_heads + h, head_dim, dtype, row);
                    for (int64_t g = 0; g < group; g++) {
                        float s = 0.0f;
#pragma omp simd reduction(+ : s)
                        for (int64_t d = 0; d < head_dim; d++) s += qf[g][d] * row[d];
                        scores[g][t] = s;
                    }
                }
                for (int64_t g = 0; g < group; g++) {
                    float block_max = scores[g][0];
                    for (int64_t t = 1; t < count; t++) block_max = scores[g][t] > block_max ? scores[g][t] : block_max;
                    const float new_max = block_max > m[g] ? block_max : m[g];
                    const float correction = expf(m[g] - new_max);
                    l[g] *= correction;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; d++) acc[g][d] *= correction;
                    for (int64_t t = 0; t < count; t++) {
                        scores[g][t] = expf(scores[g][t] - new_max);
                        l[g] += scores[g][t];
                    }
                    m[g] = new_max;
                }
                for (int64_t t = 0; t < count; t++) {
                    load_row(v_cache, (block * block_size + t) * num_kv_heads + h, head_dim, dtype, row);
                    for (int64_t g = 0; g < group; g++) {
                        const float p = scores[g][t];
#pragma omp simd
                        for (int64_t d = 0; d < head_dim; d++) acc[g][d] += p * row[d];
                    }
                }
            }
            for (int64_t g = 0; g < group; g++) {
                const float inv = 1.0f / l[g];
                const int64_t o = (n * num_heads + h * group + g) * head_dim;
                if (dtype == 0) {
                    for (int64_t d = 0; d < head_dim; d++) ((float *)out)[o + d] = acc[g][d] * inv;
                } else {
                    for (int64_t d = 0; d < head_dim; d++) ((uint16_t *)out)[o + d] = f32_to_bf16(acc[g][d] * inv);
                }
            }
        }
    }
}
