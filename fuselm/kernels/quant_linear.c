/* Weight-only quantised linear layers for CPU: y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias).
 *
 * Decode streams every weight once per step, so bytes per weight set the speed at small batch.
 * torch's own CPU ops for this (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) run 5-100x
 * slower than fp32 oneDNN with fp32 activations on an AVX2 EPYC (measured: gate/up [3072 x 576]
 * at one row 1559 / 2251 us against 238 us packed fp32), so fuselm has its own. The weights are
 * never widened in memory: each thread converts 32 quantised weights at a time to float registers
 * and uses them for up to four activation rows before the next 32 (rows are tiled by four).
 *
 * Formats (fuselm/quant/formats.py writes them; its torch dequantisation is the reference):
 * - int4: qweight uint8 [N, K/2]. Each run of 32 weights of a row is 16 bytes: byte j holds
 *   weight j in its low nibble and weight j + 16 in its high nibble. Weight = q * scale + min per
 *   group of G (a multiple of 32) along K; scales and mins [N, K/G].
 * - int8: qweight int8 [N, K], weight = q * scale per group of G (a multiple of 16; G = K is per
 *   output channel); scales [N, K/G].
 * Scales and mins are float16 (scale_dtype FUSELM_F16) or float32 (FUSELM_F32; GGUF's Q4_K/Q6_K need it to
 * stay exact).
 *
 * For int4 the min term is factored out of the inner loop: sum_k x_k (q_k s + m) over a group is
 * s * sum_k x_k q_k + m * sum_k x_k, and the per-group sums of x are computed once per call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuselm_kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QL_AVX2 1
#else
#define QL_AVX2 0
#endif

#define QL_TILE_M 4   /* activation rows that share one pass over a weight row */
#define QL_BLOCK_N 16 /* weight rows per unit of parallel work */

int fuselm_qlinear_has_simd(void) { return QL_AVX2; }

static inline float half_to_float(uint16_t h) {
#if QL_AVX2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal half: normalise */
        int e = -1;
        uint32_t m = mant;
        do { e++; m <<= 1; } while ((m & 0x400) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

static inline float load_scale(const void *p, int64_t i, int dtype) {
    return dtype == FUSELM_F16 ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

#if QL_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One int4 weight row against MT activation rows. Two accumulator chains per row for MT > 2 and
 * four otherwise, so the FMAs never wait on their own latency. */
static inline __attribute__((always_inline)) void q4_row(const float *x, int64_t K, const uint8_t *q, const void *scales,
                                                         const void *mins, int sdt, const float *xsum, int64_t G,
                                                         const int MT, float *out) {
    const int64_t groups = K / G;
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 total[QL_TILE_M];
    float min_part[QL_TILE_M];
    for (int m = 0; m < MT; m++) total[m] = _mm256_setzero_ps(), min_part[m] = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        __m256 acc[QL_TILE_M][4];
        for (int m = 0; m < MT; m++)
            for (int a = 0; a < 4; a++) acc[m][a] = _mm256_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(q + k / 2));
            const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            for (int m = 0; m < MT; m++) {
                const float *xr = x + m * K + k;
                if (MT <= 2) {
                    acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[m][0]);
                    acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[m][1]);
                    acc[m][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[m][2]);
                    acc[m][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[m][3]);
                } else {
                    acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[m][0]);
                    acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[m][1]);
                    acc[m][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[m][0]);
                    acc[m][1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[m][1]);
                }
            }
        }
        const float s = load_scale(scales, g, sdt), mn = load_scale(mins, g, sdt);
        const __m256 sv = _mm256_set1_ps(s);
        for (int m = 0; m < MT; m++) {
            __m256 a = _mm256_add_ps(acc[m][0], acc[m][1]);
            if (MT <= 2) a = _mm256_add_ps(a, _mm256_add_ps(acc[m][2], acc[m][3]));
            total[m] = _mm256_fmadd_ps(a, sv, total[m]);
            min_part[m] += mn * xsum[m * groups + g];
        }
    }
    for (int m = 0; m < MT; m++) out[m] = hsum8(total[m]) + min_part[m];
}

/* One int8 weight row against MT activation rows; 32 weights per step (16 for a 16-wide group). */
static inline __attribute__((always_inline)) void q8_row(const float *x, int64_t K, const int8_t *q, const void *scales,
                                                         int sdt, int64_t G, const int MT, float *out) {
    const int64_t groups = K / G;
    __m256 total[QL_TILE_M];
    for (int m = 0; m < MT; m++) total[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256 acc[QL_TILE_M][4];
        for (int m = 0; m < MT; m++)
            for (int a = 0; a < 4; a++) acc[m][a] = _mm256_setzero_ps();
        int64_t k = g * G;
        const int64_t end = (g + 1) * G;
        for (; k + 32 <= end; k += 32) {
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k))));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k + 8))));
            const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k + 16))));
            const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k + 24))));
            for (int m = 0; m < MT; m++) {
                const float *xr = x + m * K + k;
                const int b = MT <= 2 ? 2 : 0; /* four chains for one or two rows, two for more */
                acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[m][1]);
                acc[m][b] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[m][b]);
                acc[m][b + 1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[m][b + 1]);
            }
        }
        for (; k < end; k += 16) {
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k))));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k + 8))));
            for (int m = 0; m < MT; m++) {
                const float *xr = x + m * K + k;
                acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[m][1]);
            }
        }
        const __m256 sv = _mm256_set1_ps(load_scale(scales, g, sdt));
        for (int m = 0; m < MT; m++) {
            const __m256 a = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
            total[m] = _mm256_fmadd_ps(a, sv, total[m]);
        }
    }
    for (int m = 0; m < MT; m++) out[m] = hsum8(total[m]);
}

#else
static inline void q4_row(const float *x, int64_t K, const uint8_t *q, const void *scales, const void *mins, int sdt,
                          const float *xsum, int64_t G, const int MT, float *out) {
    const int64_t groups = K / G;
    for (int m = 0; m < MT; m++) {
        float total = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            float dot = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k += 32)
                for (int j = 0; j < 16; j++) {
                    const uint8_t b = q[k / 2 + j];
                    dot += x[m * K + k + j] * (float)(b & 0x0F) + x[m * K + k + j + 16] * (float)(b >> 4);
                }
            total += dot * load_scale(scales, g, sdt) + load_scale(mins, g, sdt) * xsum[m * groups + g];
        }
        out[m] = total;
    }
}

static inline void q8_row(const float *x, int64_t K, const int8_t *q, const void *scales, int sdt, int64_t G,
                          const int MT, float *out) {
    const int64_t groups = K / G;
    for (int m = 0; m < MT; m++) {
        float total = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            float dot = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) dot += x[m * K + k] * (float)q[k];
            total += dot * load_scale(scales, g, sdt);
        }
        out[m] = total;
    }
}
#endif

/* Rows [m0, m0 + MT) of y for weight rows [n0, n1), float activations. */
static inline __attribute__((always_inline)) void tile(const float *x, const void *qweight, const void *scales,
                                                       const void *mins, const float *bias, float *y, const float *xsum,
                                                       int64_t ldy, int64_t K, int64_t G, int bits, int sdt, int64_t m0,
                                                       int64_t n0, int64_t n1, const int MT) {
    const int64_t groups = K / G;
    const int64_t scale_row = groups * (sdt == FUSELM_F16 ? 2 : 4);
    float out[QL_TILE_M];
    for (int64_t n = n0; n < n1; n++) {
        const char *sc = (const char *)scales + n * scale_row, *mn = mins ? (const char *)mins + n * scale_row : NULL;
        if (bits == 4)
            q4_row(x + m0 * K, K, (const uint8_t *)qweight + n * (K / 2), sc, mn, sdt, xsum + m0 * groups, G, MT, out);
        else
            q8_row(x + m0 * K, K, (const int8_t *)qweight + n * K, sc, sdt, G, MT, out);
        const float b = bias != NULL ? bias[n] : 0.0f;
        for (int m = 0; m < MT; m++) y[(m0 + m) * ldy + n] = out[m] + b;
    }
}

/* float_activations: 1 keeps x in float (exact weight-only arithmetic, slower); 0 rounds x to int16 per 32 values
 * for quant_rows.c's integer dot products where the build has AVX2 (the float path stays for the scalar build and
 * for groups quant_rows.c does not take, such as 48 wide). An int4 or int8 g32 weight in int4_rows16.c's or
 * int8_rows16.c's tiles comes with scales NULL (the tiles hold them) and always takes rounded activations. */
/* y has row stride ldy (>= N): a fused projection writes each part into its columns. */
void fuselm_qlinear_ld(const float *x, const void *qweight, const void *scales, const void *mins, const float *bias,
                       float *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t G, int bits, int scale_dtype,
                       int float_activations, int num_threads) {
    if (scales == NULL) { /* g32 in sixteen-row tiles (int4_rows16.c, int8_rows16.c): rounded activations only */
        fuselm_rows16_linear(x, qweight, bits, scale_dtype, bias, y, ldy, M, N, K, num_threads);
        return;
    }
    const int64_t groups = K / G;
    QActs acts;
    if (!float_activations && fuselm_qacts_prepare(&acts, x, K, M, K, G, bits, num_threads)) { /* quant_rows.c */
        const int64_t row_blocks = (N + QL_BLOCK_N - 1) / QL_BLOCK_N;
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t blk = 0; blk < row_blocks; blk++) {
            const int64_t n0 = blk * QL_BLOCK_N, n1 = n0 + QL_BLOCK_N < N ? n0 + QL_BLOCK_N : N;
            fuselm_qrows(&acts, 0, M, qweight, scales, mins, scale_dtype, n0, n1, y, ldy);
            if (bias != NULL)
                for (int64_t m = 0; m < M; m++)
                    for (int64_t n = n0; n < n1; n++) y[m * ldy + n] += bias[n];
        }
        fuselm_qacts_release(&acts);
        return;
    }
    float *xsum = NULL;
    if (bits == 4) { /* per-group sums of x for the min term */
        xsum = (float *)malloc((size_t)(M * groups) * sizeof(float));
        for (int64_t m = 0; m < M; m++)
            for (int64_t g = 0; g < groups; g++) {
                float s = 0.0f;
                for (int64_t k = g * G; k < (g + 1) * G; k++) s += x[m * K + k];
                xsum[m * groups + g] = s;
            }
    }
    const int64_t blocks = (N + QL_BLOCK_N - 1) / QL_BLOCK_N;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * QL_BLOCK_N, n1 = n0 + QL_BLOCK_N < N ? n0 + QL_BLOCK_N : N;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4)
            tile(x, qweight, scales, mins, bias, y, xsum, ldy, K, G, bits, scale_dtype, m0, n0, n1, 4);
        switch (M - m0) {
        case 3: tile(x, qweight, scales, mins, bias, y, xsum, ldy, K, G, bits, scale_dtype, m0, n0, n1, 3); break;
        case 2: tile(x, qweight, scales, mins, bias, y, xsum, ldy, K, G, bits, scale_dtype, m0, n0, n1, 2); break;
        case 1: tile(x, qweight, scales, mins, bias, y, xsum, ldy, K, G, bits, scale_dtype, m0, n0, n1, 1); break;
        default: break;
        }
    }
    free(xsum);
}

void fuselm_qlinear(const float *x, const void *qweight, const void *scales, const void *mins, const float *bias, float *y,
                    int64_t M, int64_t N, int64_t K, int64_t G, int bits, int scale_dtype, int float_activations,
                    int num_threads) {
    fuselm_qlinear_ld(x, qweight, scales, mins, bias, y, N, M, N, K, G, bits, scale_dtype, float_activations, num_threads);
}

/* The full float32 weight [N, K] (q * scale + min, as fuselm/quant/formats.py's reference), for
 * prompt chunks: from a few dozen rows on a float GEMM over a dequantised copy beats the
 * row-streaming kernel above, and the copy is one layer's worth of scratch, reused. */
void fuselm_dequantize(const void *qweight, const void *scales, const void *mins, float *out, int64_t N, int64_t K,
                       int64_t G, int bits, int scale_dtype, int num_threads) {
    if (scales == NULL) { /* tiles */
        if (bits == 8)
            fuselm_int8_rows16_dequantize(qweight, scale_dtype, out, N, K, num_threads);
        else
            fuselm_int4_rows16_dequantize(qweight, scale_dtype, out, N, K, num_threads);
        return;
    }
    const int64_t groups = K / G;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t n = 0; n < N; n++) {
        float *o = out + n * K;
        for (int64_t g = 0; g < groups; g++) {
            const float s = load_scale(scales, n * groups + g, scale_dtype);
            const float mn = bits == 4 ? load_scale(mins, n * groups + g, scale_dtype) : 0.0f;
            if (bits == 4) {
                const uint8_t *q = (const uint8_t *)qweight + n * (K / 2) + g * G / 2;
                for (int64_t r = 0; r < G; r += 32)
                    for (int j = 0; j < 16; j++) {
                        const uint8_t b = q[r / 2 + j];
                        o[g * G + r + j] = (float)(b & 0x0F) * s + mn;
                        o[g * G + r + j + 16] = (float)(b >> 4) * s + mn;
                    }
            } else {
                const int8_t *q = (const int8_t *)qweight + n * K + g * G;
                for (int64_t k = 0; k < G; k++) o[g * G + k] = (float)q[k] * s;
            }
        }
    }
}
