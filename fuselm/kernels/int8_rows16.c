/* int8 weights (groups of 32, GGUF Q8_0's layout) repacked sixteen rows to a tile, for vpdpbusd.
 *
 * int4_rows16.c's layout for int8: quant_rows.c's int8 rows widen 32 weights to int16 per step, multiply with
 * vpmaddwd and end every row in a horizontal reduction and a scale stream of its own; at batch 1 on a
 * Mixtral-like MoE layer in Q8_0 (K = 512-1,024) that held the routed experts to ~24 GB/s of a 35-47 GB/s
 * machine, and llama.cpp's Q8_0 decode ahead of fuselm's. Here a tile holds one 32-weight block of sixteen
 * consecutive rows:
 *
 *     bytes 0-511: eight 64-byte vectors; vector v < 4, int32 lane r: row r's weights 4v..4v+3 of the block,
 *                  vector 4 + v: its weights 16+4v..16+4v+3, each stored as the unsigned byte w + 128
 *     then the sixteen rows' scales (float16 or float32, as the weight had them)
 *
 * vpdpbusd multiplies unsigned bytes by signed ones: the weights are the unsigned side (w + 128) and the
 * activations quant_rows.c's split int16 levels (v = 256 h + l, int8 halves, in the quads layout whose values
 * 0-15 and 16-31 of a block are what vectors 0-3 and 4-7 meet: the access pattern of int4_rows16.c's low and
 * high nibbles). Per block and row, sum((w + 128) v) - 128 sum(v) is the exact integer dot product sum(w v),
 * with sum(v) the block's level sum made once per activation row (QActs.xv); the largest term,
 * 32 x 255 x 32639, fits int32. A block ends with one convert and one FMA for all sixteen rows, a group of
 * sixteen rows with one 64-byte store.
 *
 * The result equals quant_rows.c's int8 rows up to the order of the float sums over blocks (the integer dot
 * product per block is the same exact value), and every output row is computed by the same instructions
 * whatever the other activation rows of the call are.
 *
 * Where it runs: where int4_rows16.c's tiles run (AVX512_VNNI builds), for int8 weights in groups of 32 with
 * float16/float32 scales: MoE experts (GroupedExperts) and dense projections (QuantLinear), which tell the
 * tiles by bits 8 and scales NULL.
 */
#include <stdint.h>

#include "fuselm_kernels.h"

/* bytes of a call's first tiles asked for at its start; past them the hardware prefetchers alone stream the tiles.
 * Each tile used to ask for the one 16 KB on as well (one MoE layer in Q8_0 at one row, one thread, took 370-410 us
 * with 12-16 KB, 540 us with 24 tiles), but with both threads streaming it held the reads back: on a 2-vCPU Zen 4
 * EPYC, in-process alternation, batch-1 decode of the Mixtral-like / Qwen2-MoE-like Q8_0 files 79.4 -> 98.2 and
 * 62.4 -> 78.1 tok/s (16 rounds, medians), batch 8 / 32 1.09x / 1.08x, one Qwen2-MoE-like layer from 0.66-0.69 to
 * 0.82-0.83 of a plain read of the same weights, one thread 349-367 -> 325 us. int4_rows16.c's per-tile
 * prefetch measured neither better nor worse without it (0.96x / 1.00x), so it stays. */
#define R16_PREFETCH_BYTES 16384

static int64_t tile_bytes_of(int scale_dtype) {
    return 512 + 16 * (scale_dtype == FUSELM_F16 ? 2 : 4);
}

int64_t fuselm_int8_rows16_bytes(int64_t N, int64_t K, int scale_dtype) {
    return (N / 16) * (K / 32) * tile_bytes_of(scale_dtype);
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
int fuselm_int8_rows16_available(void) {
    return 1;
}

#include "rows16_simd.h"

/* One group of sixteen weight rows (its tiles from `tile`) against MT activation rows from m0. */
static inline __attribute__((always_inline)) void group_rows(const QActs *a, int64_t m0, const uint8_t *tile,
                                                             int64_t tile_bytes, int sdt, const int MT, float *y,
                                                             int64_t ldy) {
    const int64_t K = a->K, blocks = K / 32;
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[4];
    for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < blocks; kb++, tile += tile_bytes) {
        __m512i w[8];
        for (int v = 0; v < 8; v++) w[v] = _mm512_loadu_si512((const void *)(tile + 64 * v));
        const __m512 scales = load_16(tile + 512, sdt);
        /* the block's values 0-15 in the split layout, and how far on its values 16-31 are (int4_rows16.c) */
        const int64_t at = (kb / 4) * 128 + (kb % 4) * 16;
        const int64_t high = 16 * (blocks - (kb / 4) * 4 < 4 ? blocks - (kb / 4) * 4 : 4);
        for (int m = 0; m < MT; m++) {
            const int8_t *h = a->xh + (m0 + m) * K + at, *l = a->xl + (m0 + m) * K + at;
            __m512i h0 = zero, h1 = zero, l0 = zero, l1 = zero; /* four chains: halves x values 0-15 / 16-31 */
            for (int v = 0; v < 4; v++) {
                h0 = _mm512_dpbusd_epi32(h0, w[v], broadcast4(h + 4 * v));
                h1 = _mm512_dpbusd_epi32(h1, w[4 + v], broadcast4(h + high + 4 * v));
                l0 = _mm512_dpbusd_epi32(l0, w[v], broadcast4(l + 4 * v));
                l1 = _mm512_dpbusd_epi32(l1, w[4 + v], broadcast4(l + high + 4 * v));
            }
            const __m512i biased = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(h0, h1), 8), _mm512_add_epi32(l0, l1));
            const __m512i s = _mm512_sub_epi32(biased, _mm512_set1_epi32(128 * a->xv[(m0 + m) * blocks + kb]));
            const float xs = a->xs[(m0 + m) * blocks + kb];
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(scales, _mm512_set1_ps(xs)), acc[m]);
        }
    }
    for (int m = 0; m < MT; m++) _mm512_storeu_ps(y + (m0 + m) * ldy, acc[m]);
}

static inline __attribute__((always_inline)) void rows_tile(const QActs *a, int64_t m0, const uint8_t *tiles, int sdt,
                                                            int64_t n0, int64_t n1, float *y, int64_t ldy, const int MT) {
    const int64_t blocks = a->K / 32, tile_bytes = tile_bytes_of(sdt);
    for (int64_t n = n0; n < n1; n += 16)
        group_rows(a, m0, tiles + (n / 16) * blocks * tile_bytes, tile_bytes, sdt, MT, y + n, ldy);
}

void fuselm_int8_rows16(const QActs *a, int64_t m0, int64_t rows, const void *tiles, int scale_dtype, int64_t n0,
                        int64_t n1, float *y, int64_t ldy) {
    const uint8_t *t = (const uint8_t *)tiles;
    const int64_t tile_bytes = tile_bytes_of(scale_dtype);
    const int64_t first = (n0 / 16) * (a->K / 32) * tile_bytes, last = (n1 / 16) * (a->K / 32) * tile_bytes;
    for (int64_t at = first; at < last && at < first + R16_PREFETCH_BYTES; at += 64)
        _mm_prefetch((const char *)t + at, _MM_HINT_T0);
    int64_t m = m0;
    for (; m + 4 <= m0 + rows; m += 4) rows_tile(a, m, t, scale_dtype, n0, n1, y, ldy, 4);
    switch (m0 + rows - m) {
    case 3: rows_tile(a, m, t, scale_dtype, n0, n1, y, ldy, 3); break;
    case 2: rows_tile(a, m, t, scale_dtype, n0, n1, y, ldy, 2); break;
    case 1: rows_tile(a, m, t, scale_dtype, n0, n1, y, ldy, 1); break;
    default: break;
    }
}

void fuselm_int8_rows16_dequantize(const void *tiles, int scale_dtype, float *out, int64_t N, int64_t K,
                                   int num_threads) {
    const int64_t blocks = K / 32, tile_bytes = tile_bytes_of(scale_dtype);
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t group = 0; group < N / 16; group++) {
        for (int64_t kb = 0; kb < blocks; kb++) {
            const uint8_t *tile = (const uint8_t *)tiles + (group * blocks + kb) * tile_bytes;
            float scales[16];
            _mm512_storeu_ps(scales, load_16(tile + 512, scale_dtype));
            for (int r = 0; r < 16; r++) {
                float *o = out + (group * 16 + r) * K + kb * 32;
                for (int v = 0; v < 4; v++)
                    for (int j = 0; j < 4; j++) {
                        o[4 * v + j] = (float)((int)tile[64 * v + 4 * r + j] - 128) * scales[r];
                        o[16 + 4 * v + j] = (float)((int)tile[64 * (4 + v) + 4 * r + j] - 128) * scales[r];
                    }
            }
        }
    }
}
#else /* without VNNI nothing is repacked (fuselm_int8_rows16_available says so), so these are never reached */
int fuselm_int8_rows16_available(void) {
    return 0;
}

void fuselm_int8_rows16(const QActs *a, int64_t m0, int64_t rows, const void *tiles, int scale_dtype, int64_t n0,
                        int64_t n1, float *y, int64_t ldy) {
    (void)a, (void)m0, (void)rows, (void)tiles, (void)scale_dtype, (void)n0, (void)n1, (void)y, (void)ldy;
}

void fuselm_int8_rows16_dequantize(const void *tiles, int scale_dtype, float *out, int64_t N, int64_t K,
                                   int num_threads) {
    (void)tiles, (void)scale_dtype, (void)out, (void)N, (void)K, (void)num_threads;
}
#endif
