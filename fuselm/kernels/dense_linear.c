/* float32 linear layers over a panel-packed weight: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
 *
 * Why fuselm has its own fp32 GEMM: on an AVX2-only CPU torch's F.linear in fp32 is slow from two
 * rows on, and oneDNN's prepacked weights (fuselm/kernels/onednn.py) are opaque, so the C decode
 * step (decode_layers.c) could not use them and a float model kept paying ~20 eager ops per layer.
 * This layout is known to fuselm, serves every row count, and is the only copy of the weight.
 *
 * Layout: W is cut into panels of 16 output columns; panel p holds W[16p .. 16p+15, k] for every
 * k, k-major: packed[(p * K + k) * 16 + j] = W[16p + j, k] (zero past N). With AVX2 a 6 x 16
 * register tile (12 accumulators) takes, per k, two loads of the panel and six broadcasts of x:
 * the classic Haswell-class micro-kernel shape. The AVX-512 variants (x86-64-v4) take up to 12 rows x two
 * adjacent panels (24 zmm accumulators of 32) from the same layout: per k two loads and twelve
 * broadcasts feed 24 FMAs of 16 lanes (the engine times 12 against 8 rows per machine: tile_rows_max). Measured against the AVX2 tile on a 2-vCPU AMD EPYC
 * (AVX-512, loaded machine, one thread, best of 21 interleaved rounds, SmolLM2-135M shapes):
 * 1.3-1.5x at one row, 2.0-2.4x from 8 to 256 rows (benchmarks/kernel_isa.py). At one row the same
 * loop reads each panel once, sequentially, so decode streams the weight at memory speed. K is
 * cut into blocks of at most KC_MAX (one block for K <= 768: a 12-row x tile of SmolLM2's K = 576 is
 * 27 KB of a 48 KB L1, and each tile's outputs are stored once instead of after 256 + 256 + 64);
 * from a tile of rows on, panels go in blocks that share one pass over the x rows, and each block's
 * tiles prefetch the next block into L2 (Prefetch below); panels are split between threads. With AVX-512,
 * up to FEW_ROWS rows (a decode batch) take passes of a few rows over blocks of 4 panels instead
 * (rows_panels), the next block asked for while each is computed.
 */
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fuselm_kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define FL_DENSE_SIMD 1
#define MR 12          /* rows of a register tile: 12 x 32 columns = 24 zmm accumulators of the 32 */
#define TILE_PANELS 2  /* panels (16 columns each) one tile covers */
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FL_DENSE_SIMD 1
#define MR 6           /* 6 x 16 columns = 12 ymm accumulators of the 16 */
#define TILE_PANELS 1
#else
#define FL_DENSE_SIMD 0
#define MR 6
#define TILE_PANELS 1
#endif

#define NR 16
#define TW (NR * TILE_PANELS) /* columns of a full tile */
#define KC_MAX 768 /* the longest K block (k_block) */
#if defined(__AVX512F__)
#define FEW_ROWS 128 /* up to this many rows take the passes of rows_panels: a decode batch (max_num_seqs 128) */
#else
#define FEW_ROWS MR
#endif
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

static inline void store(float out[MR][TW], float *y, int64_t ldy, int mr, int ncols, int first, const float *bias) {
    for (int r = 0; r < mr; r++) {
        float *yr = y + r * ldy;
        if (first)
            for (int j = 0; j < ncols; j++) yr[j] = out[r][j] + (bias != NULL ? bias[j] : 0.0f);
        else
            for (int j = 0; j < ncols; j++) yr[j] += out[r][j];
    }
}

/* C tile [MRC x (16 * PANELS)] (+)= x[MRC rows, 0 .. kc) @ the slices of PANELS adjacent panels
 * (the next one `stride` floats on), for compile-time MRC and PANELS: named accumulators (not an
 * array, which GCC keeps on the stack) so all of them stay in registers. Every output is one FMA
 * chain from zero over k whatever the tile shape or ISA, so the AVX2 and AVX-512 tiles give the
 * same bits. first: start from bias (or 0) instead of y. Columns from `ncols` on are not stored. */
#define FL_TILE_ARGS const float *x, int64_t ldx, const float *panel, int64_t stride, float *y, int64_t ldy, int64_t kc, \
                     int ncols, int first, const float *bias, const char *pf, int64_t pf_lines
#if defined(__AVX512F__)
#define FL_ACC(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps()
#define FL_FMA(r)                                                        \
    if (ROWS > r) {                                                      \
        const __m512 a = _mm512_set1_ps(x[r * ldx + k]);                 \
        c##r##0 = _mm512_fmadd_ps(a, b0, c##r##0);                       \
        if (PANELS > 1) c##r##1 = _mm512_fmadd_ps(a, b1, c##r##1);       \
    }
#define FL_OUT(r)                                                        \
    if (ROWS > r) {                                                      \
        _mm512_storeu_ps(out[r], c##r##0);                               \
        if (PANELS > 1) _mm512_storeu_ps(out[r] + 16, c##r##1);          \
    }
#define FL_TILE(MRC, NP)                                                                                     \
    static void tile##MRC##_##NP(FL_TILE_ARGS) {                                                             \
        enum { ROWS = MRC, PANELS = NP };                                                                    \
        const int64_t pf_every = pf_lines <= 0 ? kc : kc / pf_lines > 1 ? kc / pf_lines : 1;                  \
        FL_ACC(0); FL_ACC(1); FL_ACC(2); FL_ACC(3); FL_ACC(4); FL_ACC(5);                                    \
        FL_ACC(6); FL_ACC(7); FL_ACC(8); FL_ACC(9); FL_ACC(10); FL_ACC(11);                                  \
        const float *next = panel + stride;                                                                  \
        for (int64_t k = 0; k < kc;) {                                                                       \
            if (pf_lines > 0) _mm_prefetch(pf, _MM_HINT_T1), pf += 64, pf_lines--;                           \
            const int64_t k_end = k + pf_every < kc ? k + pf_every : kc;                                     \
            for (; k < k_end; k++) {                                                                         \
                const __m512 b0 = _mm512_loadu_ps(panel + k * NR);                                           \
                const __m512 b1 = PANELS > 1 ? _mm512_loadu_ps(next + k * NR) : b0;                          \
                FL_FMA(0) FL_FMA(1) FL_FMA(2) FL_FMA(3) FL_FMA(4) FL_FMA(5)                                  \
                FL_FMA(6) FL_FMA(7) FL_FMA(8) FL_FMA(9) FL_FMA(10) FL_FMA(11)                                \
            }                                                                                                \
        }                                                                                                    \
        float out[MR][TW];                                                                                   \
        FL_OUT(0) FL_OUT(1) FL_OUT(2) FL_OUT(3) FL_OUT(4) FL_OUT(5)                                          \
        FL_OUT(6) FL_OUT(7) FL_OUT(8) FL_OUT(9) FL_OUT(10) FL_OUT(11)                                        \
        store(out, y, ldy, MRC, ncols < NR * PANELS ? ncols : NR * PANELS, first, bias);                     \
    }
#elif FL_DENSE_SIMD
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
#define FL_TILE(MRC, NP)                                                                                     \
    static void tile##MRC##_##NP(FL_TILE_ARGS) {                                                             \
        enum { ROWS = MRC };                                                                                 \
        const int64_t pf_every = pf_lines <= 0 ? kc : kc / pf_lines > 1 ? kc / pf_lines : 1;                  \
        (void)stride;                                                                                        \
        FL_ACC(0); FL_ACC(1); FL_ACC(2); FL_ACC(3); FL_ACC(4); FL_ACC(5);                                    \
        for (int64_t k = 0; k < kc;) {                                                                       \
            if (pf_lines > 0) _mm_prefetch(pf, _MM_HINT_T1), pf += 64, pf_lines--;                           \
            const int64_t k_end = k + pf_every < kc ? k + pf_every : kc;                                     \
            for (; k < k_end; k++) {                                                                         \
                const __m256 b0 = _mm256_loadu_ps(panel + k * NR), b1 = _mm256_loadu_ps(panel + k * NR + 8);\
                FL_FMA(0) FL_FMA(1) FL_FMA(2) FL_FMA(3) FL_FMA(4) FL_FMA(5)                                  \
            }                                                                                                \
        }                                                                                                    \
        float out[MR][TW];                                                                                   \
        FL_OUT(0) FL_OUT(1) FL_OUT(2) FL_OUT(3) FL_OUT(4) FL_OUT(5)                                          \
        store(out, y, ldy, MRC, ncols, first, bias);                                                         \
    }
#else
#define FL_TILE(MRC, NP)                                                                                     \
    static void tile##MRC##_##NP(FL_TILE_ARGS) {                                                             \
        float out[MR][TW] = {{0}};                                                                           \
        (void)pf, (void)pf_lines;                                                                            \
        for (int r = 0; r < MRC; r++)                                                                        \
            for (int64_t k = 0; k < kc; k++)                                                                 \
                for (int j = 0; j < NR * NP; j++)                                                            \
                    out[r][j] += x[r * ldx + k] * panel[j / NR * stride + k * NR + j % NR];                  \
        store(out, y, ldy, MRC, ncols, first, bias);                                                         \
    }
#endif

typedef void (*tile_fn)(FL_TILE_ARGS);
FL_TILE(1, 1) FL_TILE(2, 1) FL_TILE(3, 1) FL_TILE(4, 1) FL_TILE(5, 1) FL_TILE(6, 1)
#if MR == 12
FL_TILE(7, 1) FL_TILE(8, 1) FL_TILE(9, 1) FL_TILE(10, 1) FL_TILE(11, 1) FL_TILE(12, 1)
FL_TILE(1, 2) FL_TILE(2, 2) FL_TILE(3, 2) FL_TILE(4, 2) FL_TILE(5, 2) FL_TILE(6, 2)
FL_TILE(7, 2) FL_TILE(8, 2) FL_TILE(9, 2) FL_TILE(10, 2) FL_TILE(11, 2) FL_TILE(12, 2)
/* by panels in the tile, then row count */
static const tile_fn tiles[TILE_PANELS + 1][MR + 1] = {
    {NULL},
    {NULL, tile1_1, tile2_1, tile3_1, tile4_1, tile5_1, tile6_1, tile7_1, tile8_1, tile9_1, tile10_1, tile11_1, tile12_1},
    {NULL, tile1_2, tile2_2, tile3_2, tile4_2, tile5_2, tile6_2, tile7_2, tile8_2, tile9_2, tile10_2, tile11_2, tile12_2},
};
#else
static const tile_fn tiles[TILE_PANELS + 1][MR + 1] = {
    {NULL}, {NULL, tile1_1, tile2_1, tile3_1, tile4_1, tile5_1, tile6_1}};
#endif

/* The length of the K blocks for a reduction of length K: one block up to KC_MAX, else equal blocks of at
 * most KC_MAX. Every path (few rows, tiles, any split between threads) blocks K alike, so a row's sums do
 * not depend on the path. */
static inline int64_t k_block(int64_t K) {
    if (K <= KC_MAX) return K;
    const int64_t blocks = (K + KC_MAX - 1) / KC_MAX;
    return (K + blocks - 1) / blocks;
}

/* Weight lines to bring into L2 while tiles compute: the panels a thread multiplies next. Decode steps
 * stream every layer's weight from memory (SmolLM2-135M's 30 layers are ~425 MB in float32); without this
 * the first row tile over each panel block waited for its slices: a one-thread C decode step of 64-256
 * rows ran its projections at 196-239 GFLOP/s against 275-283 for the same shapes with their weights in
 * cache, 222-248 with this (2-vCPU AMD EPYC with AVX-512, benchmarks/decode_gemm.py). The lines are
 * spread over the tiles (`per_tile` each), and within a tile evenly over its k steps (one every kc / per_tile
 * steps, asked between runs of plain steps so the FMA loop itself is unchanged), so the loads overlap the
 * arithmetic instead of queueing behind each other. Asking for a tile's lines on its first k steps, one a step,
 * outran what one core's miss queue takes (~14 GB/s on a Zen 3 core) and left the rest of the tile without
 * reads in flight; spread, on a 2-vCPU AMD EPYC (Zen 3), 2 threads, weights from memory, in-process alternation,
 * the same bits: SmolLM2's projections at 8-32 rows 1.05-1.24x, at 96-384 rows 0.94-1.03x; the float32 decode
 * step at 8 / 16 / 32 / 64 / 128 rows 1.01x / 1.09x / 1.04x / 0.99x / 1.02x (benchmarks/decode_gemm.py --parts
 * steps). Spreading by a per-step test of k inside the FMA loop lost 5-18% from 96 rows on. */
typedef struct {
    const char *next;
    int64_t left, per_tile;
} Prefetch;

static Prefetch prefetch_over(const float *from, int64_t floats, int64_t tiles_left) {
    const int64_t lines = floats * (int64_t)sizeof(float) / 64;
    Prefetch pf = {(const char *)from, from != NULL ? lines : 0, 0};
    pf.per_tile = tiles_left > 0 ? (pf.left + tiles_left - 1) / tiles_left : 0;
    return pf;
}

/* Tiles of mr rows over panels [p_begin, p_end) for one K block [k0, k0 + kc): TILE_PANELS
 * panels at a time, one at the end where fewer are left; each takes its share of `pf`. */
static void tile_run(const float *x, int64_t ldx, const float *packed, const float *bias, float *y, int64_t ldy,
                     int mr, int64_t N, int64_t K, int64_t k0, int64_t kc, int64_t p_begin, int64_t p_end,
                     Prefetch *pf) {
    for (int64_t p = p_begin; p < p_end;) {
        const int np = p + TILE_PANELS <= p_end ? TILE_PANELS : 1;
        const int64_t cols = N - p * NR < np * NR ? N - p * NR : np * NR;
        int64_t lines = pf->per_tile < pf->left ? pf->per_tile : pf->left;
        if (lines > kc) lines = kc;
        tiles[np][mr](x + k0, ldx, packed + (p * K + k0) * NR, K * NR, y + p * NR, ldy, kc, (int)cols, k0 == 0,
                      bias != NULL ? bias + p * NR : NULL, pf->next, lines);
        pf->next += lines * 64, pf->left -= lines;
        p += np;
    }
}

#if defined(__AVX512F__)
#define ROW_PANELS 4 /* panels a few rows' pass reads side by side: independent FMA chains */
#define ROW_PASS_ROWS 6 /* up to this many rows take it at once (6 x 4 accumulators); more rows take it again */
/* R rows of x against the whole panels [p0, p1) that lie inside N, ROW_PANELS at a time: the 1-row tiles
 * above keep two FMA chains (two panels) in flight, which held an LM head GEMV to ~38 GB/s on one core.
 * Each output is summed as tile_run sums it (per K block one chain from zero over k, blocks added in
 * turn, the bias after the first), so the bits are the same. While a block is computed, the lines of the
 * next one (up to panel pf_limit) from share_from / share_of to (share_from + R) / share_of of them are
 * asked for into L2, a few per k step. Returns the first panel not done. */
static inline __attribute__((always_inline)) int64_t row_panels(const float *x, int64_t ldx, const float *packed,
                                                                const float *bias, float *y, int64_t ldy, int64_t N,
                                                                int64_t K, int64_t p0, int64_t p1, const int R,
                                                                int64_t pf_limit, int64_t share_from,
                                                                int64_t share_of) {
    const int64_t kb = k_block(K);
    int64_t p = p0;
    for (; p + ROW_PANELS <= p1 && (p + ROW_PANELS) * NR <= N; p += ROW_PANELS) {
        const float *w = packed + p * K * NR;
        /* this call's share of the next block's lines (a panel is K lines of 64 bytes), spread over its k steps */
        const int64_t next_panels = pf_limit - (p + ROW_PANELS) < ROW_PANELS ? pf_limit - (p + ROW_PANELS) : ROW_PANELS;
        const int64_t pf_total = next_panels > 0 ? next_panels * K : 0;
        const char *pf = (const char *)(w + ROW_PANELS * K * NR) + pf_total * share_from / share_of * 64;
        const char *pf_end = (const char *)(w + ROW_PANELS * K * NR) + pf_total * (share_from + R) / share_of * 64;
        const int64_t pf_per_k = ((pf_end - pf) / 64 + K - 1) / K;
        __m512 t[ROW_PASS_ROWS][ROW_PANELS], c[ROW_PASS_ROWS][ROW_PANELS];
#pragma GCC unroll 6
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int j = 0; j < ROW_PANELS; j++) t[r][j] = _mm512_setzero_ps(); /* set by the first K block */
        for (int64_t k0 = 0; k0 < K; k0 += kb) {
            const int64_t k1 = k0 + kb < K ? k0 + kb : K;
#pragma GCC unroll 6
            for (int r = 0; r < R; r++)
#pragma GCC unroll 4
                for (int j = 0; j < ROW_PANELS; j++) c[r][j] = _mm512_setzero_ps();
            for (int64_t k = k0; k < k1; k++) {
                for (int64_t q = 0; q < pf_per_k && pf < pf_end; q++, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
                __m512 b[ROW_PANELS];
#pragma GCC unroll 4
                for (int j = 0; j < ROW_PANELS; j++) b[j] = _mm512_loadu_ps(w + (j * K + k) * NR);
#pragma GCC unroll 6
                for (int r = 0; r < R; r++) {
                    const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
#pragma GCC unroll 4
                    for (int j = 0; j < ROW_PANELS; j++) c[r][j] = _mm512_fmadd_ps(a, b[j], c[r][j]);
                }
            }
#pragma GCC unroll 6
            for (int r = 0; r < R; r++)
#pragma GCC unroll 4
                for (int j = 0; j < ROW_PANELS; j++)
                    t[r][j] = k0 > 0 ? _mm512_add_ps(t[r][j], c[r][j])
                                     : _mm512_add_ps(c[r][j], bias != NULL ? _mm512_loadu_ps(bias + (p + j) * NR)
                                                                           : _mm512_setzero_ps());
        }
#pragma GCC unroll 6
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int j = 0; j < ROW_PANELS; j++) _mm512_storeu_ps(y + r * ldy + (p + j) * NR, t[r][j]);
    }
    return p;
}

static int64_t pass_panels(const float *x, int64_t ldx, const float *packed, const float *bias, float *y, int64_t ldy,
                           int64_t M, int64_t N, int64_t K, int64_t p0, int64_t p1, int64_t pf_limit,
                           int64_t share_from, int64_t share_of) {
    switch (M) {
    case 1: return row_panels(x, ldx, packed, bias, y, ldy, N, K, p0, p1, 1, pf_limit, share_from, share_of);
    case 2: return row_panels(x, ldx, packed, bias, y, ldy, N, K, p0, p1, 2, pf_limit, share_from, share_of);
    case 3: return row_panels(x, ldx, packed, bias, y, ldy, N, K, p0, p1, 3, pf_limit, share_from, share_of);
    case 4: return row_panels(x, ldx, packed, bias, y, ldy, N, K, p0, p1, 4, pf_limit, share_from, share_of);
    case 5: return row_panels(x, ldx, packed, bias, y, ldy, N, K, p0, p1, 5, pf_limit, share_from, share_of);
    case 6: return row_panels(x, ldx, packed, bias, y, ldy, N, K, p0, p1, 6, pf_limit, share_from, share_of);
    default: return p0;
    }
}

/* Up to FEW_ROWS rows: per block of ROW_PANELS panels (64 columns, 147 KB at K = 576), passes of at most
 * ROW_PASS_ROWS rows, of nearly equal height (13 = 5 + 4 + 4), the first reading the block from memory and
 * the others from L2. With more than one pass each asks for its rows' share of the next block's lines into
 * L2, spread over its k steps, so the weight streams from memory while every pass computes: without that, a
 * few-row GEMM took about its arithmetic at the FMA peak plus its weight reads at the stream rate, not the
 * larger of the two, and from 13 rows on the tiles below (12 x 32, blocks of 8 panels prefetched by item)
 * did no better. 2-vCPU AMD EPYC (Zen 4), 2 threads, weights from memory, in-process alternation, the same
 * bits (benchmarks/decode_gemm.py --cold): SmolLM2's projections and LM head at 8-24 rows 1.0-1.3x, at 28-128
 * rows 1.0-1.35x, 1,024- and 4,096-deep weights at 16-128 rows 1.09-1.87x; the float32 decode step at 12 / 16 /
 * 24 / 64 / 128 rows 1.08-1.19x; a single pass (1-6 rows) asking for the next block was 0.89-1.05x, so it
 * leaves that to the hardware. From 256 rows (prompt chunks) the passes were 0.95-1.03x of the tiles: they
 * keep the tiles, except in the row chunks (ROW_CHUNK rows) of the narrow layers' items below, where the passes
 * were 1.0-1.08x of the tiles at 160-512 rows (weights from memory or from cache). The sums are row_panels', so
 * the bits are still tile_run's. Returns the first panel not done. */
static int64_t rows_panels(const float *x, int64_t ldx, const float *packed, const float *bias, float *y, int64_t ldy,
                           int64_t M, int64_t N, int64_t K, int64_t p0, int64_t p1) {
    const int64_t passes = (M + ROW_PASS_ROWS - 1) / ROW_PASS_ROWS;
    const int64_t pf_limit = passes > 1 ? p1 : 0;
    int64_t p = p0;
    while (p < p1) {
        const int64_t pe = p + ROW_PANELS < p1 ? p + ROW_PANELS : p1;
        int64_t done = p;
        for (int64_t i = 0, m0 = 0; i < passes; i++) {
            const int64_t rows = M / passes + (i < M % passes); /* passes of nearly equal height: 13 = 5 + 4 + 4 */
            /* each pass asks for the share of the next block's lines that its rows are of M */
            done = pass_panels(x + m0 * ldx, ldx, packed, bias, y + m0 * ldy, ldy, rows, N, K, p, pe, pf_limit, m0, M);
            if (done == p) return p; /* fewer than ROW_PANELS whole panels left: the tiles take them */
            m0 += rows;
        }
        p = done;
    }
    return p;
}
#elif FL_DENSE_SIMD
/* R rows of x against the whole panels [p0, p1) that lie inside N, P panels at a time (2P ymm accumulators per row):
 * the tiles read one panel (one weight stream, two FMA chains per row) at a time, which held an LM head GEMV to ~26
 * GB/s on two Zen 3 cores. In-process alternation against the tiles, 2-vCPU AMD EPYC (Zen 3), same bits:
 * - 1 row, four panels: 32,000 x 1,024 1.10-1.37x (26 -> 31-35 GB/s), 49,152 x 576 1.18-1.19x, 1,024 x 1,024 and
 *   3,072 x 576 from L3 1.16-1.29x; a Q4_0 Mixtral-like model at batch 1 1.11x (its f32 LM head is half a token).
 *   Two panels were 0.93-0.97x of four, six 0.55-0.85x;
 * - 2 and 3 rows, two panels (2 x 3 x 4 accumulators fit the 16 registers): 1.10-1.48x on the same shapes;
 * - 4-6 rows as 3 rows streaming and the others again from L2 were 0.89-1.15x: they keep the tiles.
 * Summed as tile_run sums it, so the bits are the same. Returns the first panel not done. */
static inline __attribute__((always_inline)) int64_t row_panels(const float *x, int64_t ldx, const float *packed,
                                                                const float *bias, float *y, int64_t ldy, int64_t N,
                                                                int64_t K, int64_t p0, int64_t p1, const int R,
                                                                const int P) {
    const int64_t kb = k_block(K);
    int64_t p = p0;
    for (; p + P <= p1 && (p + P) * NR <= N; p += P) {
        const float *w = packed + p * K * NR;
        __m256 t[3][8], c[3][8];
#pragma GCC unroll 3
        for (int r = 0; r < R; r++)
#pragma GCC unroll 8
            for (int j = 0; j < 2 * P; j++) t[r][j] = _mm256_setzero_ps();
        for (int64_t k0 = 0; k0 < K; k0 += kb) {
            const int64_t k1 = k0 + kb < K ? k0 + kb : K;
#pragma GCC unroll 3
            for (int r = 0; r < R; r++)
#pragma GCC unroll 8
                for (int j = 0; j < 2 * P; j++) c[r][j] = _mm256_setzero_ps();
            for (int64_t k = k0; k < k1; k++) {
                __m256 a[3];
#pragma GCC unroll 3
                for (int r = 0; r < R; r++) a[r] = _mm256_broadcast_ss(x + r * ldx + k);
#pragma GCC unroll 8
                for (int j = 0; j < 2 * P; j++) {
                    const __m256 b = _mm256_loadu_ps(w + ((j >> 1) * K + k) * NR + (j & 1) * 8);
#pragma GCC unroll 3
                    for (int r = 0; r < R; r++) c[r][j] = _mm256_fmadd_ps(a[r], b, c[r][j]);
                }
            }
#pragma GCC unroll 3
            for (int r = 0; r < R; r++)
#pragma GCC unroll 8
                for (int j = 0; j < 2 * P; j++)
                    t[r][j] = k0 > 0 ? _mm256_add_ps(t[r][j], c[r][j])
                                     : _mm256_add_ps(c[r][j], bias != NULL ? _mm256_loadu_ps(bias + p * NR + j * 8)
                                                                           : _mm256_setzero_ps());
        }
#pragma GCC unroll 3
        for (int r = 0; r < R; r++)
#pragma GCC unroll 8
            for (int j = 0; j < 2 * P; j++) _mm256_storeu_ps(y + r * ldy + p * NR + j * 8, t[r][j]);
    }
    return p;
}

static int64_t rows_panels(const float *x, int64_t ldx, const float *packed, const float *bias, float *y, int64_t ldy,
                           int64_t M, int64_t N, int64_t K, int64_t p0, int64_t p1) {
    switch (M) {
    case 1: return row_panels(x, ldx, packed, bias, y, ldy, N, K, p0, p1, 1, 4);
    case 2: return row_panels(x, ldx, packed, bias, y, ldy, N, K, p0, p1, 2, 2);
    case 3: return row_panels(x, ldx, packed, bias, y, ldy, N, K, p0, p1, 3, 2);
    default: return p0;
    }
}
#endif

/* The rows a register tile takes at x's row stride `ldx`: MR, or fewer where MR rows would crowd one set of
 * the L1 data cache. With 64-byte lines and 64 sets (4 KB a way: 32 KB 8-way on Zen 4, 48 KB 12-way on Golden
 * Cove), a row stride that is a multiple of 4 KB (K = 1,024, 2,048, 3,072, 4,096: most models' hidden sizes)
 * puts all twelve rows' lines of each k in one set, more than its ways, and the tile's broadcasts missed L1 at
 * every k. Tiles of 8 rows keep each set within its ways; each output is the same FMA chain whatever the tile's
 * rows, so the bits do not change. 2-vCPU AMD EPYC (Zen 4), 2 threads, in-process alternation, GFLOP/s at 16 /
 * 32 / 128 / 1,024 rows: 1,536 x 1,024 118 / 122 / 120 / 125 -> 152 / 157 / 167 / 170; 2,048 x 1,024 135 / 136
 * / 133 / 126 -> 181 / 183 / 186 / 173; 1,024 x 4,096 149 / 152 / 150 / 165 -> 179 / 182 / 193 / 204. */
#define L1_SETS 64
#define L1_WAYS_MIN 8
/* The most rows a register tile takes (fuselm_dense_set_tile_rows): MR unless the engine measured fewer to be
 * faster on this CPU. On a 2-vCPU Zen 4 EPYC tiles of 8 rows x 32 columns ran 1.02-1.09x faster than tiles of 12
 * at every SmolLM2 shape and row count from 16 to 512 (K from 256 to 2,064, so not the x tile's share of L1); the
 * AVX-512 tiles were written for 12 on a CPU with a 48 KB L1. runner/kernel_choice.py times both per machine. */
static int tile_rows_max = MR;

void fuselm_dense_set_tile_rows(int rows) { tile_rows_max = rows < 1 ? 1 : rows > MR ? MR : rows; }

int fuselm_dense_max_tile_rows(void) { return MR; }

static int tile_rows_at_stride(int64_t ldx) {
    int count[L1_SETS] = {0};
    for (int r = 0; r < tile_rows_max; r++)
        if (++count[(r * ldx * (int64_t)sizeof(float) / 64) % L1_SETS] > L1_WAYS_MIN) return r;
    return tile_rows_max;
}

/* Rows [m_begin, m_end) x panels [p0, p1) of y = x @ W^T (+ bias). From a tile of rows on, each panel block's
 * tiles prefetch the next block, and the last block `after` (after_floats floats; NULL: nothing). */
static void panels(const float *x, int64_t ldx, const float *packed, const float *bias, float *y, int64_t ldy,
                   int64_t m_begin, int64_t m_end, int64_t N, int64_t K, int64_t p0, int64_t p1, const float *after,
                   int64_t after_floats) {
    const int64_t M = m_end - m_begin, kb = k_block(K);
    x += m_begin * ldx, y += m_begin * ldy;
    if (M <= FEW_ROWS) { /* a few rows (decode, speculative verification): the weight streams from memory,
                    * so each panel is read from it once, front to back; blocking panels by K block (below) made 5 rows
                    * of SmolLM2's LM head take 2x one row's time. Each output is summed in the same order
                    * on both paths (per K block one FMA chain from zero, blocks added to y in turn, the
                    * bias after the first), so a row's result does not depend on how many rows share the
                    * call, nor on how the work is split: a verification computes bit for bit what plain
                    * decoding does (tests/test_dense_linear.py). */
#if FL_DENSE_SIMD
        p0 = rows_panels(x, ldx, packed, bias, y, ldy, M, N, K, p0, p1);
#endif
        for (int64_t p = p0; p < p1; p += TILE_PANELS) {
            const int64_t pe = p + TILE_PANELS < p1 ? p + TILE_PANELS : p1;
            for (int64_t k0 = 0; k0 < K; k0 += kb) {
                /* the panels stream front to back and the hardware follows each, but a core's stream alone ran
                 * 4-6 rows at ~15 GB/s on two Zen 3 cores: each tile also asks for the next panel's slice, spread
                 * over its k steps (Zen 3, 2 threads, in-process alternation, same bits: SmolLM2's projections
                 * at 4-6 rows 0.96-1.16x, the float32 decode step at 4 / 5 / 6 / 8 rows 1.10x / 1.12x / 1.05x /
                 * 1.01x; two or four panels ahead were no better) */
                const int64_t kc = K - k0 < kb ? K - k0 : kb;
                Prefetch pf = {NULL, 0, 0};
                if (pe < p1) pf = prefetch_over(packed + (pe * K + k0) * NR, kc * NR, 1);
                for (int64_t m0 = 0; m0 < M; m0 += MR) /* FEW_ROWS may be more than a tile's rows */
                    tile_run(x + m0 * ldx, ldx, packed, bias, y + m0 * ldy, ldy, (int)(M - m0 < MR ? M - m0 : MR), N,
                             K, k0, kc, p, pe, &pf);
            }
        }
        return;
    }
    const int tile_rows = tile_rows_at_stride(ldx);
    const int64_t row_tiles = (M + tile_rows - 1) / tile_rows, k_blocks = (K + kb - 1) / kb;
    /* The rows go in row_tiles tiles of nearly equal height (8 rows: 4 + 4, not 6 + 2): a tile of r rows has 2r
     * FMA chains (AVX2: 4r with AVX-512), which hide the FMA latency only from about 4 rows on, so a remainder
     * tile of one or two rows ran at a quarter or half of the peak. Tile heights never change a sum's order.
     * 2-vCPU AMD EPYC (Zen 3), 2 threads, in-process alternation: SmolLM2 projections at 7-20 rows 1.04-1.12x
     * with the weights in cache, 0.99-1.08x from memory; the float32 decode step at 7 / 14 / 20 / 26 rows
     * 1.10x / 1.15x / 1.05x / 1.07x (8, 13: 1.00x), the same tokens. Row chunks of equal height in the item
     * split below (50 rows: 25 + 25) were 0.91-0.97x: they stay 48 rows, in 6-row tiles. */
    const int64_t base_rows = M / row_tiles, taller = M % row_tiles; /* the first `taller` tiles take one more */
    for (int64_t pb = p0; pb < p1; pb += PANELS_PER_BLOCK) {
        const int64_t pe = pb + PANELS_PER_BLOCK < p1 ? pb + PANELS_PER_BLOCK : p1;
        const int64_t next_end = pe + PANELS_PER_BLOCK < p1 ? pe + PANELS_PER_BLOCK : p1;
        const int64_t tiles_here = k_blocks * row_tiles * ((pe - pb + TILE_PANELS - 1) / TILE_PANELS);
        Prefetch pf = pe < p1 ? prefetch_over(packed + pe * K * NR, (next_end - pe) * K * NR, tiles_here)
                              : prefetch_over(after, after_floats, tiles_here);
        for (int64_t k0 = 0; k0 < K; k0 += kb) {
            const int64_t kc = K - k0 < kb ? K - k0 : kb;
            for (int64_t i = 0, m0 = 0; i < row_tiles; i++) {
                const int mr = (int)(base_rows + (i < taller));
                tile_run(x + m0 * ldx, ldx, packed, bias, y + m0 * ldy, ldy, mr, N, K, k0, kc, pb, pe, &pf);
                m0 += mr;
            }
        }
    }
}

/* y [M, ldy] (first N columns written) = x [M, ldx] @ W^T (+ bias [N]); W packed by fuselm_dense_pack.
 *
 * Layers with many panels (the LM head, gate/up), and every layer up to FEW_ROWS rows, split the panels
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
    /* one thread (each grouped expert's piece in moe.c) has nothing to balance: items of one panel would only
     * trade the two-panel tiles for one-panel ones */
    if (M <= FEW_ROWS || num_threads == 1
        || (num_panels + per_block - 1) / per_block >= ITEMS_PER_THREAD * num_threads) {
        if (num_threads > num_panels) num_threads = (int)num_panels;
#pragma omp parallel num_threads(num_threads)
        {
#ifdef _OPENMP
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
            const int64_t t = 0, T = 1;
#endif
            panels(x, ldx, packed, bias, y, ldy, 0, M, N, K, num_panels * t / T, num_panels * (t + 1) / T, NULL, 0);
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
        /* Each item prefetches a share of a panel block some item will read: with at least as many row chunks as
         * threads, its row chunk's share of the next block (the threads are on this block's chunks now); with fewer
         * (decode's 13-48 rows on two threads), the share of the item num_threads on, the one this thread most likely
         * takes next as the threads take items in turn: the next block would mostly land in the other thread's cache.
         * Weights from memory, 2 threads, a 2-vCPU Zen 4 EPYC, the same bits: 16-32 rows of SmolLM2's narrow
         * projections 1.02-1.15x, of 1,024 x 1,024 and 1,536 x 1,024 1.04-1.18x; SmolLM2 batch-16 / 32 decode
         * 1.028x / 1.016x (in-process alternation, the same tokens). */
        const int64_t target = item + (row_chunks < num_threads ? num_threads : row_chunks);
        const int64_t tb = target / row_chunks * per_block, trc = target % row_chunks;
        const int64_t next = tb < num_panels ? ((tb + per_block < num_panels ? tb + per_block : num_panels) - tb) * K * NR : 0;
        const int64_t share0 = next * trc / row_chunks / 16 * 16, share1 = next * (trc + 1) / row_chunks / 16 * 16;
        panels(x, ldx, packed, bias, y, ldy, rc * ROW_CHUNK, m_end, N, K, pb, pe, next > 0 ? packed + tb * K * NR + share0 : NULL,
               share1 - share0); /* one panel block */
    }
}
