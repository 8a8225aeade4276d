/* float32 linear layers over a panel-packed weight: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
 *
 * Why fuselm has its own fp32 GEMM: on an AVX2-only CPU torch's F.linear in fp32 is slow from two
 * rows on, and oneDNN's prepacked weights (fuselm/kernels/onednn.py) are opaque, so the C decode
 * step (decode_layers.c) could not use them and a float model kept paying ~20 eager ops per layer.
 * This layout is known to fuselm, serves every row count, and is the only copy of the weight.
 *
 * Layout: W is cut into panels of 16 output columns; panel p holds W[16p .. 16p+15, k] for every
 * k, k-major: packed[(p * K + k) * 16 + j] = W[16p + j, k] (zero past N). A 6 x 16 register tile
 * (12 accumulators) takes, per k, two loads of the panel and six broadcasts of x: the classic
 * Haswell-class micro-kernel shape. At one row the same loop reads each panel once, sequentially,
 * so decode streams the weight at memory speed. K is blocked by KC so the panel slice and the x
 * tile stay in L1; panels are split between threads.
 */
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fuselm_kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FL_DENSE_SIMD 1
#else
#define FL_DENSE_SIMD 0
#endif

#define NR 16
#define MR 6
#define KC 256
#define PANELS_PER_BLOCK 8 /* panels that share one pass over the x rows (their slices stay in L2) */

int fuselm_dense_has_simd(void) { return FL_DENSE_SIMD; }

int64_t fuselm_dense_packed_size(int64_t N, int64_t K) { return (N + NR - 1) / NR * NR * K; }

void fuselm_dense_pack(const float *w, float *packed, int64_t N, int64_t K, int num_threads) {
    const int64_t panels = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t p = 0; p < panels; p++) {
        float *dst = packed + p * K * NR;
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < NR; j++) {
                const int64_t n = p * NR + j;
                dst[k * NR + j] = n < N ? w[n * K + k] : 0.0f;
            }
    }
}

/* C tile [MRC x 16] (+)= x[MRC rows, 0 .. kc) @ panel slice, for a compile-time MRC: named
 * accumulators (not an array, which GCC keeps on the stack) so all twelve stay in registers.
 * first: start from bias (or 0) instead of y. Columns from `ncols` on are not stored. */
#if FL_DENSE_SIMD
#define FL_ACC(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps()
#define FL_FMA(r)                                                        \
    if (ROWS > r) {                                                      \
        const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);           \
        c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);                       \
        c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);                       \
    }
#define FL_OUT(r)                                                        \
    if (ROWS > r) {                                                      \
        _mm256_storeu_ps(out[r], c##r##0);                               \
        _mm256_storeu_ps(out[r] + 8, c##r##1);                           \
    }
#define FL_TILE(MRC)                                                                                         \
    static void tile##MRC(const float *x, int64_t ldx, const float *panel, float *y, int64_t ldy, int64_t kc, \
                          int ncols, int first, const float *bias) {                                         \
        enum { ROWS = MRC };                                                                                 \
        FL_ACC(0); FL_ACC(1); FL_ACC(2); FL_ACC(3); FL_ACC(4); FL_ACC(5);                                    \
        for (int64_t k = 0; k < kc; k++) {                                                                   \
            const __m256 b0 = _mm256_loadu_ps(panel + k * NR), b1 = _mm256_loadu_ps(panel + k * NR + 8);    \
            FL_FMA(0) FL_FMA(1) FL_FMA(2) FL_FMA(3) FL_FMA(4) FL_FMA(5)                                      \
        }                                                                                                    \
        float out[MR][NR];                                                                                   \
        FL_OUT(0) FL_OUT(1) FL_OUT(2) FL_OUT(3) FL_OUT(4) FL_OUT(5)                                          \
        store(out, y, ldy, MRC, ncols, first, bias);                                                         \
    }
#else
#define FL_TILE(MRC)                                                                                         \
    static void tile##MRC(const float *x, int64_t ldx, const float *panel, float *y, int64_t ldy, int64_t kc, \
                          int ncols, int first, const float *bias) {                                         \
        float out[MR][NR] = {{0}};                                                                           \
        for (int r = 0; r < MRC; r++)                                                                        \
            for (int64_t k = 0; k < kc; k++)                                                                 \
                for (int j = 0; j < NR; j++) out[r][j] += x[r * ldx + k] * panel[k * NR + j];                \
        store(out, y, ldy, MRC, ncols, first, bias);                                                         \
    }
#endif

static inline void store(float out[MR][NR], float *y, int64_t ldy, int mr, int ncols, int first, const float *bias) {
    for (int r = 0; r < mr; r++) {
        float *yr = y + r * ldy;
        if (first)
            for (int j = 0; j < ncols; j++) yr[j] = out[r][j] + (bias != NULL ? bias[j] : 0.0f);
        else
            for (int j = 0; j < ncols; j++) yr[j] += out[r][j];
    }
}

FL_TILE(1)
FL_TILE(2)
FL_TILE(3)
FL_TILE(4)
FL_TILE(5)
FL_TILE(6)

typedef void (*tile_fn)(const float *, int64_t, const float *, float *, int64_t, int64_t, int, int, const float *);
static const tile_fn tiles[MR + 1] = {NULL, tile1, tile2, tile3, tile4, tile5, tile6}; /* by row count */

/* Rows [m_begin, m_end) x panels [p0, p1) of y = x @ W^T (+ bias). */
static void panels(const float *x, int64_t ldx, const float *packed, const float *bias, float *y, int64_t ldy,
                   int64_t m_begin, int64_t m_end, int64_t N, int64_t K, int64_t p0, int64_t p1) {
    const int64_t M = m_end - m_begin;
    x += m_begin * ldx, y += m_begin * ldy;
    if (M <= MR) { /* one tile of rows (decode, speculative verification): the weight streams from memory,
                    * so each panel is read once, front to back; blocking panels by KC (below) made 5 rows
                    * of SmolLM2's LM head take 2x one row's time. Each output is summed in the same order
                    * on both paths (per KC block one FMA chain from zero, blocks added to y in turn, the
                    * bias after the first), so a row's result does not depend on how many rows share the
                    * call, nor on how the work is split: a verification computes bit for bit what plain
                    * decoding does (tests/test_dense_linear.py). */
        for (int64_t p = p0; p < p1; p++) {
            const int ncols = (int)(N - p * NR < NR ? N - p * NR : NR);
            const float *b = bias != NULL ? bias + p * NR : NULL;
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                const int64_t kc = K - k0 < KC ? K - k0 : KC;
                tiles[M](x + k0, ldx, packed + (p * K + k0) * NR, y + p * NR, ldy, kc, ncols, k0 == 0, b);
            }
        }
        return;
    }
    for (int64_t pb = p0; pb < p1; pb += PANELS_PER_BLOCK) {
        const int64_t pe = pb + PANELS_PER_BLOCK < p1 ? pb + PANELS_PER_BLOCK : p1;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = K - k0 < KC ? K - k0 : KC;
            for (int64_t m0 = 0; m0 < M; m0 += MR) {
                const int mr = (int)(M - m0 < MR ? M - m0 : MR);
                for (int64_t p = pb; p < pe; p++) {
                    const int ncols = (int)(N - p * NR < NR ? N - p * NR : NR);
                    const float *slice = packed + (p * K + k0) * NR;
                    const float *b = bias != NULL ? bias + p * NR : NULL;
                    float *yt = y + m0 * ldy + p * NR;
                    const float *xt = x + m0 * ldx + k0;
                    tiles[mr](xt, ldx, slice, yt, ldy, kc, ncols, k0 == 0, b);
                }
            }
        }
    }
}

/* y [M, ldy] (first N columns written) = x [M, ldx] @ W^T (+ bias [N]); W packed by fuselm_dense_pack.
 *
 * Layers with many panels (the LM head, gate/up), and every layer up to MR rows, split the panels
 * evenly between threads, each a contiguous range (each thread streams its share of the weight).
 * Narrow layers (q/k/v, o, down: 36-60 panels) at more rows are cut into items of ROW_CHUNK rows x
 * a block of panels, handed out one at a time: on a 2-vCPU VM whose vCPUs lose ~25% of their time
 * to steal, the even split left one thread waiting at the end of each GEMM (libgomp's barrier was
 * ~10% of GEMM time in a py-spy profile of an offline run). Measured on a Zen 3 EPYC, 2 threads,
 * SmolLM2 shapes: o / down / q,k,v at 128-640 rows 1.01-1.14x; the same items for gate/up were
 * 0.85-0.99x, so wide layers keep the contiguous split. Neither split changes a sum's order:
 * results are bit for bit the same whatever the thread count. */
#define ROW_CHUNK 48
#define ITEMS_PER_THREAD 8
void fuselm_dense_linear(const float *x, int64_t ldx, const float *packed, const float *bias, float *y, int64_t ldy,
                         int64_t M, int64_t N, int64_t K, int num_threads) {
    const int64_t num_panels = (N + NR - 1) / NR;
    if (num_threads < 1) num_threads = 1;
    int64_t per_block = PANELS_PER_BLOCK;
    if (M <= MR || (num_panels + per_block - 1) / per_block >= ITEMS_PER_THREAD * num_threads) {
        if (num_threads > num_panels) num_threads = (int)num_panels;
#pragma omp parallel num_threads(num_threads)
        {
#ifdef _OPENMP
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
            const int64_t t = 0, T = 1;
#endif
            panels(x, ldx, packed, bias, y, ldy, 0, M, N, K, num_panels * t / T, num_panels * (t + 1) / T);
        }
        return;
    }
    const int64_t row_chunks = (M + ROW_CHUNK - 1) / ROW_CHUNK;
    while (per_block > 1 && row_chunks * ((num_panels + per_block - 1) / per_block) < ITEMS_PER_THREAD * num_threads)
        per_block /= 2;
    const int64_t panel_blocks = (num_panels + per_block - 1) / per_block;
    const int64_t items = row_chunks * panel_blocks;
    if (num_threads > items) num_threads = (int)items;
    /* a panel block's row chunks run back to back, so its slices are still warm in cache */
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t item = 0; item < items; item++) {
        const int64_t pb = item / row_chunks * per_block, rc = item % row_chunks;
        const int64_t pe = pb + per_block < num_panels ? pb + per_block : num_panels;
        const int64_t m_end = (rc + 1) * ROW_CHUNK < M ? (rc + 1) * ROW_CHUNK : M;
        panels(x, ldx, packed, bias, y, ldy, rc * ROW_CHUNK, m_end, N, K, pb, pe); /* one panel block */
    }
}
