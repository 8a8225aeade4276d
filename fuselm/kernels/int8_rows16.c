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
 * Where it runs: where int4_rows16.c's tiles run (AVX512_VNNI builds, and AVX2 builds with the kernel below the
 * VNNI one), for int8 weights in groups of 32 with float16/float32 scales: MoE experts (GroupedExperts) and dense
 * projections (QuantLinear), which tell the tiles by bits 8 and scales NULL.
 */
#include <stdint.h>
#include <string.h>

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
        int64_t high;
        const int64_t at = split_block(kb, blocks, &high);
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

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
/* AVX2 (x86-64-v3, no VNNI): the same tiles, widened. vpmaddubsw cannot take the biased weights (a pair of 255 x 128
 * products overflows its int16 sums), so each sixteen bytes of a vector (four rows x four weights) are zero-extended
 * to int16 (w + 128, exactly) and vpmaddwd multiplies them by four int16 activation levels broadcast to every row
 * (quant_rows.c's int16 layout in natural order, not the split one: one product per weight instead of two). A block's
 * int32 lanes then hold two partial sums per row; vphaddd pairs them (rows in the order 0 1 4 5 2 3 6 7 of each
 * eight, which the scales are permuted to), and sum((w + 128) v) - 128 sum(v), with sum(v) the block's level sum
 * (QActs.xv), is the exact integer sum(w v). The largest term, 32 x 255 x 32767, fits int32. Rows 0-7 of a group take
 * every block, then rows 8-15 (the group's tiles, 17 KB at K = 1,024, are in L1 for the second pass), each weight
 * quarter widened once for all MT rows, whose int32 sums alone stay live. */
#include "rows16_simd.h"

int fuselm_int8_rows16_available(void) {
    return 1;
}

/* Four int16 levels broadcast to every 64-bit lane, loaded where the asm stands (see load_broadcast4). */
static inline __m256i load_broadcast8(const int16_t *p) {
    typedef int64_t __attribute__((may_alias)) int64_alias;
    __m256i r;
    __asm__ volatile("vpbroadcastq %1, %0" : "=x"(r) : "m"(*(const int64_alias *)p));
    return r;
}

/* One group of sixteen weight rows (its tiles from `tile0`) against MT activation rows from m0. */
static inline __attribute__((always_inline)) void group_rows(const QActs *a, int64_t m0, const uint8_t *tile0,
                                                             int64_t tile_bytes, int sdt, const int MT, float *y,
                                                             int64_t ldy) {
    const int64_t K = a->K, blocks = K / 32, scale_size = sdt == FUSELM_F16 ? 2 : 4;
    const __m256i paired = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7); /* vphaddd leaves row paired[j] in lane j */
    for (int half = 0; half < 2; half++) {
        __m256 acc[4];
        for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
        const uint8_t *tile = tile0;
        for (int64_t kb = 0; kb < blocks; kb++, tile += tile_bytes) {
            const int16_t *row = a->xq + m0 * K + kb * 32; /* row m's levels of this block at row + m * K */
            __m256i s0[4], s1[4]; /* rows 8 half + 0-3 and 4-7, two partial sums each */
            for (int m = 0; m < MT; m++) s0[m] = s1[m] = _mm256_setzero_si256();
            for (int v = 0; v < 8; v++) { /* weights 4v..4v+3 (v < 4) or 16+4(v-4).. of the block */
                const uint8_t *w = tile + 64 * v + 32 * half;
                const __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)w));
                const __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
                const int64_t at = v < 4 ? 4 * v : 16 + 4 * (v - 4);
                for (int m = 0; m < MT; m++) {
                    const __m256i x = load_broadcast8(row + m * K + at);
                    s0[m] = _mm256_add_epi32(s0[m], _mm256_madd_epi16(w0, x));
                    s1[m] = _mm256_add_epi32(s1[m], _mm256_madd_epi16(w1, x));
                    __asm__ volatile("" : "+x"(s0[m]), "+x"(s1[m])); /* this row's broadcast loads before the next's */
                }
            }
            const __m256 scales = _mm256_permutevar8x32_ps(load_8(tile + 512 + 8 * scale_size * half, sdt), paired);
            for (int m = 0; m < MT; m++) {
                const __m256i s = _mm256_sub_epi32(_mm256_hadd_epi32(s0[m], s1[m]),
                                                   _mm256_set1_epi32(128 * a->xv[(m0 + m) * blocks + kb]));
                const float xs = a->xs[(m0 + m) * blocks + kb];
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scales, _mm256_set1_ps(xs)), acc[m]);
            }
        }
        for (int m = 0; m < MT; m++) /* back to row order: lane j of acc is row paired[j]'s */
            _mm256_storeu_ps(y + (m0 + m) * ldy + 8 * half, _mm256_permutevar8x32_ps(acc[m], paired));
    }
}

/* group_rows for one activation row (a decode step's): all sixteen rows in one pass, each broadcast serving four
 * quarters (four accumulators), so a block takes eight broadcasts instead of sixteen and the tiles are walked once.
 * The same integer sums and float operations as group_rows, so the same bits. One int8 Mixtral-like MoE layer at
 * batch 1 from memory, in-process alternation against group_rows at one row: 1.08-1.09x (2-vCPU Zen 3 EPYC). */
static inline void group_row1(const QActs *a, int64_t m0, const uint8_t *tile, int64_t tile_bytes, int sdt, float *y,
                              int64_t ldy) {
    const int64_t K = a->K, blocks = K / 32, scale_size = sdt == FUSELM_F16 ? 2 : 4;
    const __m256i paired = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    const int16_t *x = a->xq + m0 * K;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    for (int64_t kb = 0; kb < blocks; kb++, tile += tile_bytes, x += 32) {
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0; /* rows 0-3, 4-7, 8-11, 12-15 */
        for (int v = 0; v < 8; v++) {
            const __m256i xb = load_broadcast8(x + (v < 4 ? 4 * v : 16 + 4 * (v - 4)));
            const __m128i *w = (const __m128i *)(tile + 64 * v);
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(w)), xb));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(w + 1)), xb));
            s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(w + 2)), xb));
            s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(w + 3)), xb));
        }
        const __m256i bias = _mm256_set1_epi32(128 * a->xv[m0 * blocks + kb]);
        const __m256 xs = _mm256_set1_ps(a->xs[m0 * blocks + kb]);
        const __m256 sc0 = _mm256_permutevar8x32_ps(load_8(tile + 512, sdt), paired);
        const __m256 sc1 = _mm256_permutevar8x32_ps(load_8(tile + 512 + 8 * scale_size, sdt), paired);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_hadd_epi32(s0, s1), bias)),
                               _mm256_mul_ps(sc0, xs), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_hadd_epi32(s2, s3), bias)),
                               _mm256_mul_ps(sc1, xs), acc1);
    }
    _mm256_storeu_ps(y + m0 * ldy, _mm256_permutevar8x32_ps(acc0, paired));
    _mm256_storeu_ps(y + m0 * ldy + 8, _mm256_permutevar8x32_ps(acc1, paired));
}

#define HAVE_GROUP_ROW1 1
#endif

#if (defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)) || \
    (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__))
static inline __attribute__((always_inline)) void rows_tile(const QActs *a, int64_t m0, const uint8_t *tiles, int sdt,
                                                            int64_t n0, int64_t n1, float *y, int64_t ldy, const int MT) {
    const int64_t blocks = a->K / 32, tile_bytes = tile_bytes_of(sdt);
    for (int64_t n = n0; n < n1; n += 16) {
#ifdef HAVE_GROUP_ROW1
        if (MT == 1) {
            group_row1(a, m0, tiles + (n / 16) * blocks * tile_bytes, tile_bytes, sdt, y + n, ldy);
            continue;
        }
#endif
        group_rows(a, m0, tiles + (n / 16) * blocks * tile_bytes, tile_bytes, sdt, MT, y + n, ldy);
    }
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
            for (int r = 0; r < 16; r++) {
                if (scale_dtype == FUSELM_F16) {
                    uint16_t h;
                    memcpy(&h, tile + 512 + 2 * r, sizeof h);
                    scales[r] = _cvtsh_ss(h);
                } else {
                    memcpy(scales + r, tile + 512 + 4 * r, sizeof(float));
                }
            }
            for (int r = 0; r < 16; r++) {
                float *o = out + (group * 16 + r) * K + kb * 32;
                const __m128 scale = _mm_set1_ps(scales[r]);
                for (int v = 0; v < 8; v++) { /* row r's four weights of vector v: (w + 128) - 128 */
                    int32_t four;
                    memcpy(&four, tile + 64 * v + 4 * r, sizeof four);
                    const __m128i w = _mm_sub_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(four)), _mm_set1_epi32(128));
                    _mm_storeu_ps(o + (v < 4 ? 4 * v : 16 + 4 * (v - 4)), _mm_mul_ps(_mm_cvtepi32_ps(w), scale));
                }
            }
        }
    }
}
#else /* elsewhere (no AVX2; AVX-512 without VNNI) nothing is repacked (fuselm_int8_rows16_available says
       * so), so these are never reached */
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
