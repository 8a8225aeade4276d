/* int4 weights (groups of 32) repacked sixteen rows to a tile, for vpdpbusd with broadcast activations.
 *
 * quant_rows.c multiplies one weight row at a time: each 64-byte load holds four blocks of one row, so
 * every row ends in a horizontal reduction, reads its scales and mins as two further streams, and
 * turns each block's four int32 lanes into floats with a permute of the scale products. At batch 1 on a
 * Mixtral-like MoE layer (K = 512-1,024: 4-8 loads per row) that per-row work is as large as the dot
 * products themselves. Here a tile holds one 32-weight block of sixteen consecutive rows:
 *
 *     bytes 0-255: four 64-byte vectors; vector v, int32 lane r holds row r's bytes 4v..4v+3 of the
 *                  block (low nibbles: weights 4v..4v+3, high nibbles: 16+4v..16+4v+3, the GGUF order)
 *     then the sixteen rows' scales, then their mins (float16 or float32, as the weight had them)
 *
 * so one vpdpbusd of a vector's low nibbles against four activation bytes broadcast to every lane
 * advances sixteen rows by four weights, each row in its own lane. A block ends with one convert and two
 * FMAs for all sixteen rows (scales x the block's activation scale, mins x its sum of x), and a group of
 * sixteen rows ends with one 64-byte store: no horizontal reduction, one stream.
 *
 * The activations are quant_rows.c's split int16 levels (QActs layout FUSELM_QACTS_SPLIT8, v = 256 h + l,
 * int8 halves): four consecutive weights of a block are four consecutive bytes there too. Each lane's
 * int32 sum is the block's exact int16 dot product (256 x high-half products + low-half products), as in
 * quant_rows.c; only the order of the float sums over blocks differs (one block after the other here).
 * Every output row is computed by the same instructions whatever the other activation rows of the call
 * are, so a token's result does not depend on its batch.
 *
 * Where it runs: GroupedExperts repacks int4 g32 experts into tiles when this build has AVX512_VNNI (or is the
 * AVX2 build: the kernel below without vpdpbusd) and the shapes fit (rows a multiple of 16, K of 128), and
 * QuantLinear its dense int4 g32 parts (rows a
 * multiple of 16, K of 32: the split activations then end in a shorter quad of blocks, whose values 16-31
 * follow its values 0-15 at 16 bytes per block instead of 64); the tiles then replace the rows, scales
 * and mins (one copy). kernels/moe.c, moe_few_rows.c, quant_project.c and quant_linear.c recognise such a
 * weight by its missing scales pointer and reach this kernel through rows16.c, whose fuselm_rows16_linear is a
 * whole dense layer (it beats the dequantise-then-GEMM path at every row count measured, 1-512);
 * fuselm_int4_rows16_dequantize gives the float weight back.
 */
#include <stdint.h>
#include <string.h>

#include "fuselm_kernels.h"

#define R16_PREFETCH_TILES 24 /* tiles fetched ahead of the one being multiplied */

int64_t fuselm_int4_rows16_bytes(int64_t N, int64_t K, int scale_dtype) {
    const int64_t scale_size = scale_dtype == FUSELM_F16 ? 2 : 4;
    return (N / 16) * (K / 32) * (256 + 2 * 16 * scale_size);
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
#include "rows16_simd.h"

int fuselm_int4_rows16_available(void) {
    return 1;
}

/* One group of sixteen weight rows (its tiles from `tile`) against MT activation rows from m0. */
static inline __attribute__((always_inline)) void group_rows(const QActs *a, int64_t m0, const uint8_t *tile,
                                                             int64_t tile_bytes, int sdt, const int MT, float *y,
                                                             int64_t ldy) {
    const int64_t K = a->K, blocks = K / 32;
    const int64_t scale_bytes = 16 * (sdt == FUSELM_F16 ? 2 : 4);
    const __m512i mask = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    __m512 acc[4], acc_min[4];
    for (int m = 0; m < MT; m++) acc[m] = acc_min[m] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < blocks; kb++, tile += tile_bytes) {
        for (int64_t line = 0; line < tile_bytes; line += 64)
            _mm_prefetch((const char *)tile + R16_PREFETCH_TILES * tile_bytes + line, _MM_HINT_T0);
        __m512i lo[4], hi[4];
        for (int v = 0; v < 4; v++) {
            const __m512i b = _mm512_loadu_si512((const void *)(tile + 64 * v));
            lo[v] = _mm512_and_si512(b, mask);
            hi[v] = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask);
        }
        const __m512 scales = load_16(tile + 256, sdt), mins = load_16(tile + 256 + scale_bytes, sdt);
        /* the block's values 0-15 in the split layout, and how far on its values 16-31 are: 64 bytes in a whole
         * quad of blocks, 16 per block in a shorter last one (quant_rows.c) */
        int64_t high;
        const int64_t at = split_block(kb, blocks, &high);
        for (int m = 0; m < MT; m++) {
            const int8_t *h = a->xh + (m0 + m) * K + at, *l = a->xl + (m0 + m) * K + at;
            __m512i hl = zero, hh = zero, ll = zero, lh = zero; /* four chains: halves x nibbles */
            for (int v = 0; v < 4; v++) {
                hl = _mm512_dpbusd_epi32(hl, lo[v], broadcast4(h + 4 * v));
                hh = _mm512_dpbusd_epi32(hh, hi[v], broadcast4(h + high + 4 * v));
                ll = _mm512_dpbusd_epi32(ll, lo[v], broadcast4(l + 4 * v));
                lh = _mm512_dpbusd_epi32(lh, hi[v], broadcast4(l + high + 4 * v));
            }
            const __m512i s = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(hl, hh), 8), _mm512_add_epi32(ll, lh));
            const float *xs = a->xs + (m0 + m) * blocks, *xg = a->xg + (m0 + m) * blocks;
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(scales, _mm512_set1_ps(xs[kb])), acc[m]);
            acc_min[m] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xg[kb]), acc_min[m]);
        }
    }
    for (int m = 0; m < MT; m++) _mm512_storeu_ps(y + (m0 + m) * ldy, _mm512_add_ps(acc[m], acc_min[m]));
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
/* AVX2 (x86-64-v3, no VNNI): the same tiles and split activations, a tile in two halves of eight rows (a ymm's int32
 * lanes). vpmaddubsw of a half's low or high nibbles against four activation bytes broadcast to every lane leaves
 * each row's two pair sums (at most 2 x 15 x 128 = 3,840 apart from the sign); a block's eight of them (four
 * vectors, low and high nibbles) add in int16 lanes without overflow (8 x 3,840 = 30,720), and one vpmaddwd by 256
 * (the high halves) or by 1 (the low ones) turns them into each row's int32 dot product, exact as vpdpbusd's. Per
 * row and block that is ~7 instructions shared by eight rows, against quant_rows.c's ~10 per row and block plus its
 * per-row scale products, min term and reduction. */
#include "rows16_simd.h"

int fuselm_int4_rows16_available(void) {
    return 1;
}

/* One group of sixteen weight rows (its tiles from `tile0`) against MT (2-4) activation rows from m0: rows 0-7 over
 * every block, then rows 8-15 (bytes 32 * half of each 64-byte vector; the group's tiles, 10 KB at K = 1,024, are in
 * L1 for the second pass). Per half and block each weight vector is unpacked once for all MT rows, and only the MT
 * rows' int16 sums stay live (2 x MT + 2 nibble vectors + a mask and temporaries: within the 16 ymm registers); each
 * row's activations are reached from one pointer per row (its high-value and low-byte halves at offsets shared by
 * the rows). Both halves at once kept sixteen nibble vectors, MT x 4 float accumulators and the broadcasts live, and
 * GCC kept most of them and the sixteen activation pointers on the stack (~150 stack accesses per half and block at
 * 4 rows, ~800 instructions a tile). The min term is its own pass over the blocks afterwards. The float sums are
 * group_row1's chains (per half: scale products over the blocks in order, min products over the blocks in order,
 * then their sum) and the int16 sums wrapping integers, so a row's result is the same bits at any MT. One thread,
 * in-process alternation on a 2-vCPU AMD EPYC (Zen 3), 1,024 x 1,024 / 512 x 1,024 / 1,024 x 512 weights: 2 rows
 * 0.84-1.23x, 3 rows 1.44-1.65x, 4-8 rows 0.88-1.37x, 16-32 rows 1.06-1.14x; the Mixtral-like Q4_0 model decodes
 * 1.085x faster at batch 8 and 1.09x at batch 32 (same tokens). */
static inline __attribute__((always_inline)) void group_rows(const QActs *a, int64_t m0, const uint8_t *tile0,
                                                             int64_t tile_bytes, int sdt, const int MT, float *y,
                                                             int64_t ldy) {
    const int64_t K = a->K, blocks = K / 32;
    const int64_t scale_size = sdt == FUSELM_F16 ? 2 : 4, scale_bytes = 16 * scale_size;
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), by256 = _mm256_set1_epi16(256);
    const intptr_t to_low = (intptr_t)a->xl - (intptr_t)a->xh; /* from a row's high bytes to its low bytes */
    for (int half = 0; half < 2; half++) {
        __m256 acc[4];
        for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
        const uint8_t *tile = tile0;
        for (int64_t kb = 0; kb < blocks; kb++, tile += tile_bytes) {
            if (half == 0)
                for (int64_t line = 0; line < tile_bytes; line += 64)
                    _mm_prefetch((const char *)tile + R16_PREFETCH_TILES * tile_bytes + line, _MM_HINT_T0);
            int64_t high;
            const int64_t at = split_block(kb, blocks, &high);
            const int8_t *row = a->xh + m0 * K + at; /* row m's high bytes of this block at row + m * K */
            __m256i sh[4], sl[4];
            for (int m = 0; m < MT; m++) sh[m] = sl[m] = _mm256_setzero_si256();
            for (int v = 0; v < 4; v++) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(tile + 64 * v + 32 * half));
                const __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
                for (int m = 0; m < MT; m++) {
                    const int8_t *h = row + m * K, *l = (const int8_t *)((intptr_t)h + to_low);
                    const __m256i h0 = load_broadcast4(h + 4 * v), h1 = load_broadcast4(h + high + 4 * v);
                    sh[m] = _mm256_add_epi16(sh[m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, h0),
                                                                     _mm256_maddubs_epi16(hi, h1)));
                    const __m256i l0 = load_broadcast4(l + 4 * v), l1 = load_broadcast4(l + high + 4 * v);
                    sl[m] = _mm256_add_epi16(sl[m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, l0),
                                                                     _mm256_maddubs_epi16(hi, l1)));
                    __asm__ volatile("" : "+x"(sh[m]), "+x"(sl[m])); /* this row's broadcasts load before the next's */
                }
            }
            const __m256 scales = load_8(tile + 256 + 8 * scale_size * half, sdt);
            for (int m = 0; m < MT; m++) {
                const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(sh[m], by256), _mm256_madd_epi16(sl[m], ones));
                const float *xs = a->xs + (m0 + m) * blocks;
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scales, _mm256_set1_ps(xs[kb])), acc[m]);
            }
        }
        for (int m = 0; m < MT; m++) _mm256_storeu_ps(y + (m0 + m) * ldy + 8 * half, acc[m]);
    }
    /* the min terms: MT x 2 independent chains side by side (one after the other they waited on the FMA latency) */
    __m256 acc_min[4][2];
    for (int m = 0; m < MT; m++) acc_min[m][0] = acc_min[m][1] = _mm256_setzero_ps();
    const uint8_t *mins = tile0 + 256 + scale_bytes;
    for (int64_t kb = 0; kb < blocks; kb++, mins += tile_bytes) {
        const __m256 mins0 = load_8(mins, sdt), mins1 = load_8(mins + 8 * scale_size, sdt);
        for (int m = 0; m < MT; m++) {
            const __m256 bg = _mm256_set1_ps(a->xg[(m0 + m) * blocks + kb]);
            acc_min[m][0] = _mm256_fmadd_ps(mins0, bg, acc_min[m][0]);
            acc_min[m][1] = _mm256_fmadd_ps(mins1, bg, acc_min[m][1]);
        }
    }
    for (int m = 0; m < MT; m++)
        for (int half = 0; half < 2; half++) {
            float *out = y + (m0 + m) * ldy + 8 * half;
            _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), acc_min[m][half]));
        }
}

/* group_rows for one activation row (a decode step's): both halves of each 64-byte vector at once, so that a block
 * needs only four broadcasts live at a time. The general loop at one row kept a block's sixteen broadcasts and its
 * four float accumulators on the stack (GCC hoists the broadcasts out of the half loop). The same exact int16 sums
 * and the same float operations in the same order as group_rows, so a row's result is the same bits at any batch. */
static inline void group_row1(const QActs *a, int64_t m0, const uint8_t *tile, int64_t tile_bytes, int sdt, float *y,
                              int64_t ldy) {
    const int64_t K = a->K, blocks = K / 32;
    const int64_t scale_size = sdt == FUSELM_F16 ? 2 : 4, scale_bytes = 16 * scale_size;
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), by256 = _mm256_set1_epi16(256);
    const int8_t *xh = a->xh + m0 * K, *xl = a->xl + m0 * K;
    const float *xs = a->xs + m0 * blocks, *xg = a->xg + m0 * blocks;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, min0 = acc0, min1 = acc0;
    for (int64_t kb = 0; kb < blocks; kb++, tile += tile_bytes) {
        for (int64_t line = 0; line < tile_bytes; line += 64)
            _mm_prefetch((const char *)tile + R16_PREFETCH_TILES * tile_bytes + line, _MM_HINT_T0);
        int64_t high;
        const int64_t at = split_block(kb, blocks, &high);
        __m256i sh0 = _mm256_setzero_si256(), sl0 = sh0, sh1 = sh0, sl1 = sh0;
        for (int v = 0; v < 4; v++) {
            const __m256i b0 = _mm256_loadu_si256((const __m256i *)(tile + 64 * v));
            const __m256i b1 = _mm256_loadu_si256((const __m256i *)(tile + 64 * v + 32));
            const __m256i h_lo = broadcast4_8(xh + at + 4 * v), h_hi = broadcast4_8(xh + at + high + 4 * v);
            const __m256i l_lo = broadcast4_8(xl + at + 4 * v), l_hi = broadcast4_8(xl + at + high + 4 * v);
            const __m256i lo0 = _mm256_and_si256(b0, mask), hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), mask);
            sh0 = _mm256_add_epi16(sh0, _mm256_maddubs_epi16(lo0, h_lo));
            sh0 = _mm256_add_epi16(sh0, _mm256_maddubs_epi16(hi0, h_hi));
            sl0 = _mm256_add_epi16(sl0, _mm256_maddubs_epi16(lo0, l_lo));
            sl0 = _mm256_add_epi16(sl0, _mm256_maddubs_epi16(hi0, l_hi));
            const __m256i lo1 = _mm256_and_si256(b1, mask), hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), mask);
            sh1 = _mm256_add_epi16(sh1, _mm256_maddubs_epi16(lo1, h_lo));
            sh1 = _mm256_add_epi16(sh1, _mm256_maddubs_epi16(hi1, h_hi));
            sl1 = _mm256_add_epi16(sl1, _mm256_maddubs_epi16(lo1, l_lo));
            sl1 = _mm256_add_epi16(sl1, _mm256_maddubs_epi16(hi1, l_hi));
            __asm__("" : "+x"(sh0), "+x"(sl0), "+x"(sh1), "+x"(sl1)); /* no reassociation across v */
        }
        const __m256 bx = _mm256_set1_ps(xs[kb]), bg = _mm256_set1_ps(xg[kb]);
        const __m256i s0 = _mm256_add_epi32(_mm256_madd_epi16(sh0, by256), _mm256_madd_epi16(sl0, ones));
        const __m256i s1 = _mm256_add_epi32(_mm256_madd_epi16(sh1, by256), _mm256_madd_epi16(sl1, ones));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(load_8(tile + 256, sdt), bx), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(load_8(tile + 256 + 8 * scale_size, sdt), bx), acc1);
        min0 = _mm256_fmadd_ps(load_8(tile + 256 + scale_bytes, sdt), bg, min0);
        min1 = _mm256_fmadd_ps(load_8(tile + 256 + scale_bytes + 8 * scale_size, sdt), bg, min1);
    }
    _mm256_storeu_ps(y + m0 * ldy, _mm256_add_ps(acc0, min0));
    _mm256_storeu_ps(y + m0 * ldy + 8, _mm256_add_ps(acc1, min1));
}
#define HAVE_GROUP_ROW1 1
#endif

#if (defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)) || \
    (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__))
/* Sixteen rows' scales or mins of a tile (float16 or float32) as floats. */
static inline void tile_floats(const uint8_t *p, int sdt, float *out) {
    for (int r = 0; r < 16; r++) {
        if (sdt == FUSELM_F16) {
            uint16_t h;
            memcpy(&h, p + 2 * r, sizeof h);
            out[r] = _cvtsh_ss(h);
        } else {
            memcpy(out + r, p + 4 * r, sizeof(float));
        }
    }
}

static inline __attribute__((always_inline)) void rows_tile(const QActs *a, int64_t m0, const uint8_t *tiles, int sdt,
                                                            int64_t n0, int64_t n1, float *y, int64_t ldy, const int MT) {
    const int64_t blocks = a->K / 32, tile_bytes = 256 + 2 * 16 * (sdt == FUSELM_F16 ? 2 : 4);
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

void fuselm_int4_rows16(const QActs *a, int64_t m0, int64_t rows, const void *tiles, int scale_dtype, int64_t n0,
                        int64_t n1, float *y, int64_t ldy) {
    const uint8_t *t = (const uint8_t *)tiles;
    const int64_t tile_bytes = 256 + 2 * 16 * (scale_dtype == FUSELM_F16 ? 2 : 4);
    const int64_t first = (n0 / 16) * (a->K / 32) * tile_bytes, last = (n1 / 16) * (a->K / 32) * tile_bytes;
    /* each tile asks for the one R16_PREFETCH_TILES on; the first ones are asked for here */
    for (int64_t at = first; at < last && at < first + R16_PREFETCH_TILES * tile_bytes; at += 64)
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

void fuselm_int4_rows16_dequantize(const void *tiles, int scale_dtype, float *out, int64_t N, int64_t K,
                                   int num_threads) {
    const int64_t blocks = K / 32, tile_bytes = 256 + 2 * 16 * (scale_dtype == FUSELM_F16 ? 2 : 4);
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t group = 0; group < N / 16; group++) {
        for (int64_t kb = 0; kb < blocks; kb++) {
            const uint8_t *tile = (const uint8_t *)tiles + (group * blocks + kb) * tile_bytes;
            float scales[16], mins[16];
            tile_floats(tile + 256, scale_dtype, scales);
            tile_floats(tile + 256 + (tile_bytes - 256) / 2, scale_dtype, mins);
            for (int r = 0; r < 16; r++) {
                float *o = out + (group * 16 + r) * K + kb * 32;
                for (int v = 0; v < 4; v++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t b = tile[64 * v + 4 * r + j];
                        o[4 * v + j] = (float)(b & 0x0F) * scales[r] + mins[r];
                        o[16 + 4 * v + j] = (float)(b >> 4) * scales[r] + mins[r];
                    }
            }
        }
    }
}
#else /* elsewhere (no AVX2; AVX-512 without VNNI) nothing is repacked (fuselm_int4_rows16_available says so), so
       these are never reached */
int fuselm_int4_rows16_available(void) {
    return 0;
}

void fuselm_int4_rows16(const QActs *a, int64_t m0, int64_t rows, const void *tiles, int scale_dtype, int64_t n0,
                        int64_t n1, float *y, int64_t ldy) {
    (void)a, (void)m0, (void)rows, (void)tiles, (void)scale_dtype, (void)n0, (void)n1, (void)y, (void)ldy;
}

void fuselm_int4_rows16_dequantize(const void *tiles, int scale_dtype, float *out, int64_t N, int64_t K,
                                   int num_threads) {
    (void)tiles, (void)scale_dtype, (void)out, (void)N, (void)K, (void)num_threads;
}
#endif
