/* Per-layer CPU ops where eager torch is far from the memory bound at decode batch sizes.
 * Built with paged_attention.c into one library by fuselm/kernels/cpu.py; torch (F.linear, the
 * RMSNorm module) is the reference each is tested against.
 *
 * - fuselm_linear_bf16_small_m: y = x @ w^T (+ bias) for a few rows. Decode streams every weight
 *   once per step; oneDNN's packed bf16 path reads them at ~13 GB/s here (2-core Sapphire Rapids,
 *   STREAM-like reads reach ~22 GB/s). This reads each weight row once, front to back, computes
 *   all rows' dot products from it with vdpbf16ps, and reduces 16 outputs at once. Measured over
 *   SmolLM2-135M's 30 layers with cold caches: 16.2 GB/s at one row (oneDNN 13.4), but slower
 *   than oneDNN from 4 rows on, so fuselm uses it for single-row steps only.
 * - fuselm_rms_norm: one pass per row (float sum of squares, then scale), replacing eight small
 *   torch ops per call; rounds like HF (normalise in float, cast, then multiply by the weight).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16_simd.h"
#include "fuselm_kernels.h"

#define SMALL_M_MAX 4

int fuselm_small_m_max(void) { return SMALL_M_MAX; }

#if defined(__AVX512F__) && defined(__AVX512BF16__) /* immintrin.h comes with bf16_simd.h */

int fuselm_has_small_m_linear(void) { return 1; }

/* One tile of 16 outputs for a compile-time M: G weight rows at a time, so G * M independent
 * vdpbf16ps chains hide the instruction's latency; each weight chunk is loaded once for all M rows. */
static inline __attribute__((always_inline)) void linear_tile(const uint16_t *x, const uint16_t *w, const uint16_t *bias,
                                                              uint16_t *y, const int64_t M, int64_t N, int64_t K,
                                                              int64_t n0) {
    enum { G = 4 };
    const int64_t count = N - n0 < 16 ? N - n0 : 16;
    __m512 part[SMALL_M_MAX][16];
    for (int64_t i0 = 0; i0 < 16; i0 += G) {
        __m512 acc[G][SMALL_M_MAX];
        for (int64_t g = 0; g < G; g++)
            for (int64_t m = 0; m < M; m++) acc[g][m] = _mm512_setzero_ps();
        if (i0 < count) {
            const uint16_t *wr[G];
            for (int64_t g = 0; g < G; g++) wr[g] = w + (n0 + (i0 + g < count ? i0 + g : count - 1)) * K;
            for (int64_t k = 0; k < K; k += 32) {
                __m512bh xk[SMALL_M_MAX];
                for (int64_t m = 0; m < M; m++) xk[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
                for (int64_t g = 0; g < G; g++) {
                    const __m512bh wk = (__m512bh)_mm512_loadu_si512(wr[g] + k);
                    for (int64_t m = 0; m < M; m++) acc[g][m] = _mm512_dpbf16_ps(acc[g][m], xk[m], wk);
                }
            }
        }
        for (int64_t g = 0; g < G; g++)
            for (int64_t m = 0; m < M; m++) part[m][i0 + g] = acc[g][m];
    }
    const __mmask16 mask = count == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1u);
    __m512 b = _mm512_setzero_ps();
    if (bias != NULL)
        b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias + n0)), 16));
    for (int64_t m = 0; m < M; m++) {
        const __m512 s = _mm512_add_ps(hsum16(part[m]), b);
        _mm256_mask_storeu_epi16(y + m * N + n0, mask, (__m256i)_mm512_cvtneps_pbh(s));
    }
}

/* x [M, K], w [N, K], bias [N] or NULL, y [M, N]; all bf16, contiguous; M <= SMALL_M_MAX, K % 32 == 0. */
void fuselm_linear_bf16_small_m(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                                int64_t N, int64_t K, int num_threads) {
    const int64_t num_tiles = (N + 15) / 16;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t tile = 0; tile < num_tiles; tile++) {
        switch (M) { /* a constant M per case: the accumulators stay in registers */
            case 1: linear_tile(x, w, bias, y, 1, N, K, tile * 16); break;
            case 2: linear_tile(x, w, bias, y, 2, N, K, tile * 16); break;
            case 3: linear_tile(x, w, bias, y, 3, N, K, tile * 16); break;
            case 4: linear_tile(x, w, bias, y, 4, N, K, tile * 16); break;
            default: linear_tile(x, w, bias, y, M, N, K, tile * 16); break;
        }
    }
}
#else
int fuselm_has_small_m_linear(void) { return 0; }

void fuselm_linear_bf16_small_m(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                                int64_t N, int64_t K, int num_threads) {
    (void)num_threads;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += bf16_to_f32(x[m * K + k]) * bf16_to_f32(w[n * K + k]);
            if (bias != NULL) s += bf16_to_f32(bias[n]);
            y[m * N + n] = f32_to_bf16(s);
        }
}
#endif

/* out[M, D] = weight * cast(x * rsqrt(mean(x^2) + eps)); dtype FUSELM_F32 or FUSELM_BF16 (x, weight, out). */
void fuselm_rms_norm(const void *x, const void *weight, void *out, int64_t M, int64_t D, float eps, int dtype,
                     int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (M >= 64)
    for (int64_t m = 0; m < M; m++) {
        float ss = 0.0f;
        if (dtype == FUSELM_F32) {
            const float *xr = (const float *)x + m * D;
            const float *wr = (const float *)weight;
            float *o = (float *)out + m * D;
#pragma omp simd reduction(+ : ss)
            for (int64_t d = 0; d < D; d++) ss += xr[d] * xr[d];
            const float inv = 1.0f / sqrtf(ss / (float)D + eps);
#pragma omp simd
            for (int64_t d = 0; d < D; d++) o[d] = wr[d] * (xr[d] * inv);
        } else {
            const uint16_t *xr = (const uint16_t *)x + m * D;
            const uint16_t *wr = (const uint16_t *)weight;
            uint16_t *o = (uint16_t *)out + m * D;
#pragma omp simd reduction(+ : ss)
            for (int64_t d = 0; d < D; d++) {
                const float v = bf16_to_f32(xr[d]);
                ss += v * v;
            }
            const float inv = 1.0f / sqrtf(ss / (float)D + eps);
#pragma omp simd
            for (int64_t d = 0; d < D; d++) {
                const float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[d]) * inv));
                o[d] = f32_to_bf16(bf16_to_f32(wr[d]) * normed);
            }
        }
    }
}
