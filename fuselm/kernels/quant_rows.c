/* Quantised weight rows against a few activation rows, with the activations rounded once per call.
 *
 * At batch 1-4 a quantised matvec is bound by how fast the weights are unpacked, not by memory:
 * quant_linear.c's former int16 path spent ~12 instructions per 32 int4 weights (16-byte load, two
 * nibble masks, a 128-bit insert, a widening shuffle, vpmaddwd, a scalar scale product and its
 * broadcast, the FMA), which held a Mixtral-like MoE layer's routed experts to 10-15 GB/s of a
 * 76 GB/s machine. And every caller that cuts a matmul into pieces (kernels/moe.c: one piece per
 * expert x 64 output rows) paid the activation rounding, the per-group sums and three mallocs again
 * for every piece. Here the caller prepares the activations once (`fuselm_qacts_prepare`) and then
 * asks for any rows of any weight (`fuselm_qrows`), from any thread.
 *
 * The arithmetic: x rounded to int16 per 32 values (amax / 32767, ~15 bits, so results stay within
 * float rounding of the exact weight-only product; int8 activations as llama.cpp uses them would allow
 * vpmaddubsw at twice the multiplies per instruction, but SmolLM2's outlier channels make them cost
 * 2.1% perplexity, measured), vpmaddwd dot products per 32-weight block, each
 * block's int32 sums times weight scale x activation scale into float accumulators, int4's min term
 * as min x the float group sums of x. What changes is the instruction count per weight:
 *
 * - int4 with AVX512_VNNI (the avx512bf16 build) runs four blocks (128 weights, one 64-byte load) per
 *   step on vpdpbusd, which multiplies unsigned bytes by signed bytes: the low and high nibbles are
 *   the unsigned bytes, and each int16 level v of x, kept within +-32639, is stored as two signed
 *   bytes h, l with v = 256 h + l. Two vpdpbusd over h, a shift by 8 and two over l give every
 *   block's int16 dot product exactly (4 int32 lanes per block), so the result is the int16 path's
 *   at 128 weights for ~12 instructions instead of ~40.
 * - int4 without VNNI runs two blocks (64 weights, 32 bytes) per step: one widening load puts the 32
 *   bytes in 32 int16 lanes, a mask and a shift give the low nibbles (weights 0-15 of both blocks)
 *   and the high ones (weights 16-31). The activations are stored in that lane order at preparation
 *   (per block pair: A 0-15, B 0-15, A 16-31, B 16-31), so two vpmaddwd and an add leave block A's
 *   sums in lanes 0-7 and B's in lanes 8-15, and one convert and one FMA with [sA x 8, sB x 8]
 *   finish both.
 * - int8 runs one block per step: a widening load, vpmaddwd, convert, FMA with the block's scale.
 * - scale products (weight scale x activation scale per block) are made 16 at a time per row, and
 *   the int4 min term joins the accumulator's lanes instead of a reduction of its own.
 * - each thread prefetches the weight rows a few rows ahead: one core alone keeps too few misses in
 *   flight to stream at the machine's bandwidth.
 *
 * One layer's four routed Mixtral-shape experts (hidden 1024, 512 wide, int4 g32), one thread, loaded
 * 2-vCPU AMD EPYC: 400 us with quant_linear.c per 64-row piece, 134 us here with the weights in cache,
 * ~220 us streamed from memory.
 *
 * Every output is computed by the same instructions in the same order whatever the other rows of
 * the call are, so a token's result does not depend on the batch it is in.
 *
 * AVX-512BW (x86-64-v4 builds) as above, and AVX2 (x86-64-v3) with 256-bit blocks (below); without AVX2
 * `fuselm_qacts_prepare` returns 0 and callers keep quant_linear.c's float path.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuselm_kernels.h"

#define QR_MAX_BLOCKS 4096 /* K up to 131072, as quant_linear.c */
#define QR_PREFETCH_ROWS 8 /* weight rows fetched ahead of the one being multiplied */

#if defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__F16C__)
#include <immintrin.h>
#define QR_SIMD 1
#define QR_PREFETCH 1 /* rows_tile asks for weight rows ahead */

/* 32 values -> int16 levels in [-limit, limit] (round to nearest even), values 0-15 in lo and 16-31 in hi, and
 * their scale. */
static inline void round_block(const float *x, float *scale, float limit, __m256i *lo, __m256i *hi) {
    const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    *scale = amax / limit;
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? limit / amax : 0.0f);
    *lo = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)));
    *hi = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv)));
}

#if defined(__AVX512VNNI__)
#define QR_SPLIT 1 /* int4 rows run on vpdpbusd over activations split in two int8 halves */
#else
#define QR_SPLIT 0
#endif
#define QR_TILES QR_SPLIT /* int4 and int8 tiles (int4_rows16.c, int8_rows16.c) read the split activations */

/* One row's int16 levels (pairs layout for int4: per two blocks A 0-15, B 0-15, A 16-31, B 16-31). */
static void prepare_row16(const float *row, int64_t K, int bits, int16_t *q, float *xs) {
    const int64_t blocks = K / 32;
    for (int64_t kb = 0; kb < blocks; kb++) {
        __m256i lo, hi;
        round_block(row + kb * 32, xs + kb, 32767.0f, &lo, &hi);
        const int paired = bits == 4 && (kb | 1) < blocks; /* the last odd block stays in natural order */
        int16_t *at = paired ? q + (kb & ~(int64_t)1) * 32 + (kb % 2) * 16 : q + kb * 32;
        _mm256_storeu_si256((__m256i *)at, lo);
        _mm256_storeu_si256((__m256i *)(at + (paired ? 32 : 16)), hi);
    }
}

#if QR_TILES
/* One row's levels in [-32639, 32639] = 256 * high + low, both int8, in the quads layout: per four blocks,
 * values 0-15 of blocks A, B, C, D, then their values 16-31 (what one 64-byte load's low and high nibbles
 * hold), the high bytes in xh and the low ones in xl. A last quad of fewer blocks (K not a multiple of 128,
 * which only int4_rows16.c reads) holds its r blocks' values 0-15, then their values 16-31 16 * r on. */
static void prepare_row_split(const float *row, int64_t K, int8_t *xh, int8_t *xl, float *xs,
                              int32_t *xv /* NULL: int4 weights, which need no level sums */) {
    const int64_t blocks = K / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t kb = 0; kb < blocks; kb++) {
        __m256i v[2];
        round_block(row + kb * 32, xs + kb, 32639.0f, &v[0], &v[1]);
        if (xv != NULL) { /* the block's level sum (int8_rows16.c's correction for its biased weights) */
            const __m256i pairs = _mm256_add_epi32(_mm256_madd_epi16(v[0], ones), _mm256_madd_epi16(v[1], ones));
            xv[kb] = _mm512_reduce_add_epi32(_mm512_zextsi256_si512(pairs));
        }
        const int64_t base = (kb / 4) * 128 + (kb % 4) * 16;
        const int64_t in_quad = blocks - (kb / 4) * 4 < 4 ? blocks - (kb / 4) * 4 : 4;
        for (int half = 0; half < 2; half++) { /* values 0-15 at base, 16-31 at base + 16 * in_quad */
            const __m256i high = _mm256_srai_epi16(_mm256_add_epi16(v[half], _mm256_set1_epi16(128)), 8); /* floor */
            const __m256i low = _mm256_sub_epi16(v[half], _mm256_slli_epi16(high, 8));
            _mm_storeu_si128((__m128i *)(xh + base + 16 * in_quad * half), _mm256_cvtepi16_epi8(high));
            _mm_storeu_si128((__m128i *)(xl + base + 16 * in_quad * half), _mm256_cvtepi16_epi8(low));
        }
    }
}
#endif

/* Each group's sum of x (G a multiple of 16), 16 values at a time. */
static void group_sums(const float *row, int64_t K, int64_t G, float *xg) {
    for (int64_t g = 0; g < K / G; g++) {
        float sum = 0.0f;
        for (int64_t k = g * G; k < (g + 1) * G; k += 16) sum += _mm512_reduce_add_ps(_mm512_loadu_ps(row + k));
        xg[g] = sum;
    }
}

static inline __m512 two_scales(float lo, float hi) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(lo), (__mmask16)0xFF00, _mm512_set1_ps(hi));
}

/* Blocks kb, kb + 1 of one int4 weight row (q, c and x at block kb) into accumulator chain `chain`. */
static inline __attribute__((always_inline)) void int4_pair(const int16_t *xq, int64_t K, const uint8_t *q,
                                                            const float *c, int64_t blocks, const int MT,
                                                            __m512 acc[][2], const int chain) {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)q));
    const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi16(0x0F)), hi = _mm512_srli_epi16(b, 4);
    for (int m = 0; m < MT; m++) {
        const int16_t *x = xq + m * K;
        const __m512i s = _mm512_add_epi32(_mm512_madd_epi16(lo, _mm512_loadu_si512((const void *)x)),
                                           _mm512_madd_epi16(hi, _mm512_loadu_si512((const void *)(x + 32))));
        acc[m][chain] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), two_scales(c[m * blocks], c[m * blocks + 1]), acc[m][chain]);
    }
}

/* One int4 weight row against MT activation rows; c: the rows' block scale products [MT][blocks]. */
static inline __attribute__((always_inline)) void int4_row(const QActs *a, int64_t m0, const uint8_t *q,
                                                           const float *c, const float *mins, const int MT,
                                                           float *out) {
    const int64_t K = a->K, blocks = K / 32, groups = K / a->G;
    __m512 acc[4][2];
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int64_t kb = 0;
    for (; kb + 4 <= blocks; kb += 4) { /* two pairs, one accumulator chain each */
        int4_pair(a->xq + m0 * K + kb * 32, K, q + kb * 16, c + kb, blocks, MT, acc, 0);
        int4_pair(a->xq + m0 * K + kb * 32 + 64, K, q + kb * 16 + 32, c + kb + 2, blocks, MT, acc, 1);
    }
    if (kb + 2 <= blocks) int4_pair(a->xq + m0 * K + kb * 32, K, q + kb * 16, c + kb, blocks, MT, acc, 0), kb += 2;
    float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (kb < blocks) { /* an odd last block, natural order */
        const __m128i b = _mm_loadu_si128((const __m128i *)(q + kb * 16)), mask = _mm_set1_epi8(0x0F);
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask)));
        for (int m = 0; m < MT; m++) {
            const __m512i s = _mm512_madd_epi16(w, _mm512_loadu_si512((const void *)(a->xq + (m0 + m) * K + kb * 32)));
            tail[m] = (float)_mm512_reduce_add_epi32(s) * c[m * blocks + kb];
        }
    }
    for (int m = 0; m < MT; m++) { /* the min term, min x group sum of x, joins the accumulator's lanes */
        const float *xg = a->xg + (m0 + m) * groups;
        int64_t g = 0;
        for (; g + 16 <= groups; g += 16)
            acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(mins + g), _mm512_loadu_ps(xg + g), acc[m][1]);
        const __mmask16 rest = (__mmask16)((1u << (groups - g)) - 1u);
        acc[m][1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rest, mins + g), _mm512_maskz_loadu_ps(rest, xg + g), acc[m][1]);
        out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + tail[m];
    }
}

/* Block kb of one int8 weight row (x, q, clo and chi at block kb) into accumulator chain `chain`. */
static inline __attribute__((always_inline)) void int8_block(const int16_t *xq, int64_t K, const int8_t *q,
                                                             const float *clo, const float *chi, int64_t blocks,
                                                             const int halves, const int MT, __m512 acc[][2],
                                                             const int chain) {
    const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)q));
    for (int m = 0; m < MT; m++) {
        const __m512i s = _mm512_madd_epi16(w, _mm512_loadu_si512((const void *)(xq + m * K)));
        const __m512 scale = halves ? two_scales(clo[m * blocks], chi[m * blocks]) : _mm512_set1_ps(clo[m * blocks]);
        acc[m][chain] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[m][chain]);
    }
}

/* One int8 weight row against MT activation rows; clo/chi: block scale products for values 0-15 / 16-31. */
static inline __attribute__((always_inline)) void int8_row(const QActs *a, int64_t m0, const int8_t *q,
                                                           const float *clo, const float *chi, const int halves,
                                                           const int MT, float *out) {
    const int64_t K = a->K, blocks = K / 32;
    __m512 acc[4][2];
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int64_t kb = 0;
    for (; kb + 2 <= blocks; kb += 2) { /* one accumulator chain per block of the pair */
        int8_block(a->xq + m0 * K + kb * 32, K, q + kb * 32, clo + kb, chi + kb, blocks, halves, MT, acc, 0);
        int8_block(a->xq + m0 * K + kb * 32 + 32, K, q + kb * 32 + 32, clo + kb + 1, chi + kb + 1, blocks, halves, MT, acc, 1);
    }
    if (kb < blocks) int8_block(a->xq + m0 * K + kb * 32, K, q + kb * 32, clo + kb, chi + kb, blocks, halves, MT, acc, 0);
    for (int m = 0; m < MT; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

#if QR_SPLIT
/* Lanes 4i..4i+3 <- lane 4j + i: the scales of quad j's four blocks, four int32 sums each. */
static inline __m512i quad_index(int j) {
    return _mm512_add_epi32(_mm512_set1_epi32(4 * j), _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0));
}

/* Four int4 blocks (64 bytes at q) against MT rows of split activations (xh, xl at the quad) into chain
 * `chain`: 256 x (high half . weights) + (low half . weights) is the int16 dot product exactly. cz: each
 * row's scale products of the quad's 16-block run, `idx` picks this quad's four. */
static inline __attribute__((always_inline)) void int4_quad(const int8_t *xh, const int8_t *xl, int64_t K,
                                                            const uint8_t *q, const __m512 *cz, __m512i idx,
                                                            const int MT, __m512 acc[][2], const int chain) {
    const __m512i b = _mm512_loadu_si512((const void *)q), mask = _mm512_set1_epi8(0x0F);
    const __m512i lo = _mm512_and_si512(b, mask), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask);
    for (int m = 0; m < MT; m++) {
        const int8_t *h = xh + m * K, *l = xl + m * K;
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)h));
        s = _mm512_slli_epi32(_mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512((const void *)(h + 64))), 8);
        s = _mm512_dpbusd_epi32(s, lo, _mm512_loadu_si512((const void *)l));
        s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512((const void *)(l + 64)));
        acc[m][chain] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_permutexvar_ps(idx, cz[m]), acc[m][chain]);
    }
}

/* 16 scales from `count` (<= 16) at p + i, float16 (sdt FUSELM_F16) or float32, zero past them. */
static inline __m512 load_scales16(const void *p, int64_t i, int sdt, __mmask16 count) {
    if (sdt == FUSELM_F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(count, (const uint16_t *)p + i));
    return _mm512_maskz_loadu_ps(count, (const float *)p + i);
}

/* One int4 weight row against MT rows of split activations. Groups of 32 (scales and mins one per
 * block: GGUF's Q4_0/Q4_1/Q4_K) read the row's own scales and mins as they go; other groups pass w
 * and mins as floats per block / per group (block_scales). */
static inline __attribute__((always_inline)) void int4_row_split(const QActs *a, int64_t m0, const uint8_t *q,
                                                                 const void *row_scales, const void *row_mins, int sdt,
                                                                 const float *w, const float *mins, const int MT,
                                                                 float *out) {
    const int64_t K = a->K, blocks = K / 32, groups = K / a->G;
    const int per_block = a->G == 32;
    __m512 acc[4][2], cz[4];
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < blocks; kb += 16) { /* runs of 16 blocks: four quads */
        const int64_t nb = blocks - kb < 16 ? blocks - kb : 16;
        const __mmask16 run = (__mmask16)((1u << nb) - 1u);
        const __m512 wv = per_block ? load_scales16(row_scales, kb, sdt, run) : _mm512_maskz_loadu_ps(run, w + kb);
        for (int m = 0; m < MT; m++) cz[m] = _mm512_mul_ps(wv, _mm512_maskz_loadu_ps(run, a->xs + (m0 + m) * blocks + kb));
        if (per_block) { /* the min term, min x group sum of x, joins the accumulator's lanes */
            const __m512 mv = load_scales16(row_mins, kb, sdt, run);
            for (int m = 0; m < MT; m++)
                acc[m][1] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(run, a->xg + (m0 + m) * groups + kb), acc[m][1]);
        }
        const int8_t *h = a->xh + m0 * K + kb * 32, *l = a->xl + m0 * K + kb * 32;
        const uint8_t *qq = q + kb * 16;
        int4_quad(h, l, K, qq, cz, quad_index(0), MT, acc, 0);
        if (nb > 4) int4_quad(h + 128, l + 128, K, qq + 64, cz, quad_index(1), MT, acc, 1);
        if (nb > 8) int4_quad(h + 256, l + 256, K, qq + 128, cz, quad_index(2), MT, acc, 0);
        if (nb > 12) int4_quad(h + 384, l + 384, K, qq + 192, cz, quad_index(3), MT, acc, 1);
    }
    for (int m = 0; m < MT; m++) {
        if (!per_block) {
            const float *xg = a->xg + (m0 + m) * groups;
            for (int64_t g = 0; g < groups; g += 16) {
                const __mmask16 part = (__mmask16)(groups - g >= 16 ? 0xFFFFu : (1u << (groups - g)) - 1u);
                acc[m][1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(part, mins + g), _mm512_maskz_loadu_ps(part, xg + g), acc[m][1]);
            }
        }
        out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
    }
}
#endif

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* AVX2 (x86-64-v3): the int16 layout in natural order (one 32-block's values 0-31 in turn), one block per step.
 * A block's 16 bytes widen to 16 int16 lanes, each holding one byte: a mask gives weights 0-15 (low nibbles) and a
 * shift by 4 weights 16-31 (high nibbles), so two vpmaddwd against the block's two halves of x and an add leave
 * its 8 int32 sums; one convert and one FMA with the block's scale product finish it. int8 widens 2 x 16 bytes.
 * Two accumulator chains (blocks in turn) for any number of rows, so a row's sums do not depend on its tile: at one
 * row a block is ~8 instructions, so a chain's FMAs come further apart than their four-cycle latency.
 *
 * Before this, AVX2 builds had only quant_linear.c's integer path, which rounds the activations again on every
 * call and asks the hardware prefetcher alone for the weight, scale and min streams: a Mixtral-like MoE layer's
 * four routed int4 experts (hidden 1,024, 512 wide) at one row took 423 us on a 2-vCPU Zen 3 EPYC (9.3 GB/s of a
 * 25.6 GB/s stream probe), and the MoE kernels' single-region paths (moe_few_rows.c) could not run; with this,
 * 225-245 us. Against that path, in-process alternation on the same machine, int4 / int8 g32 weights of 1,024 to
 * 8,192 x 1,024: 1.0-1.3x at one row, 1.35-1.55x at 4 and 16 rows. */
#include <immintrin.h>
#define QR_SIMD 1
#define QR_SPLIT 0
#define QR_TILES 1 /* the tiles' AVX2 kernels read int4_rows16.c's split activations, int8_rows16.c's int16 ones */
/* No software prefetch: on a 2-vCPU Zen 3 EPYC rows_tile's prefetches made the rows 1.05-1.26x slower (int4 and int8
 * g32, 1,024-8,192 x 1,024, 1-4 rows, in-process alternation); the hardware prefetcher follows the rows alone. */
#define QR_PREFETCH 0

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 values -> int16 levels in [-limit, limit] (round to nearest even), values 0-15 in lo and 16-31 in hi (natural
 * order), and their scale: the AVX-512 variant's round_block in 256-bit steps. */
static inline void round_block(const float *x, float *scale, float limit, __m256i *lo, __m256i *hi) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16);
    const __m256 v3 = _mm256_loadu_ps(x + 24);
    const __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                      _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float a = _mm_cvtss_f32(h);
    *scale = a / limit;
    const __m256 inv = _mm256_set1_ps(a > 0.0f ? limit / a : 0.0f);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    /* packs works per 128-bit lane; the 64-bit permute puts the values back in order */
    *lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
    *hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8);
}

/* One row's int16 levels per 32 values (amax / 32767), natural order, and their scales. */
static void prepare_row16(const float *row, int64_t K, int bits, int16_t *q, float *xs) {
    (void)bits;
    for (int64_t kb = 0; kb < K / 32; kb++) {
        __m256i lo, hi;
        round_block(row + kb * 32, xs + kb, 32767.0f, &lo, &hi);
        _mm256_storeu_si256((__m256i *)(q + kb * 32), lo);
        _mm256_storeu_si256((__m256i *)(q + kb * 32 + 16), hi);
    }
}

/* One row's levels in [-32639, 32639] = 256 * high + low, both int8, in the quads layout of the AVX-512 variant's
 * prepare_row_split (what int4_rows16.c's tiles read: per four blocks, values 0-15 of blocks A, B, C, D, then their
 * values 16-31; a last quad of r < 4 blocks holds its values 16-31 16 * r on). xv: unused here, since the AVX2 int8
 * tiles read the int16 layout (tiles_read_split) and get their level sums from level_sums. */
static void prepare_row_split(const float *row, int64_t K, int8_t *xh, int8_t *xl, float *xs, int32_t *xv) {
    (void)xv;
    const int64_t blocks = K / 32;
    for (int64_t kb = 0; kb < blocks; kb++) {
        __m256i v[2];
        round_block(row + kb * 32, xs + kb, 32639.0f, &v[0], &v[1]);
        const int64_t base = (kb / 4) * 128 + (kb % 4) * 16;
        const int64_t in_quad = blocks - (kb / 4) * 4 < 4 ? blocks - (kb / 4) * 4 : 4;
        for (int half = 0; half < 2; half++) { /* values 0-15 at base, 16-31 at base + 16 * in_quad */
            const __m256i high = _mm256_srai_epi16(_mm256_add_epi16(v[half], _mm256_set1_epi16(128)), 8); /* floor */
            const __m256i low = _mm256_sub_epi16(v[half], _mm256_slli_epi16(high, 8));
            _mm_storeu_si128((__m128i *)(xh + base + 16 * in_quad * half),
                             _mm_packs_epi16(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)));
            _mm_storeu_si128((__m128i *)(xl + base + 16 * in_quad * half),
                             _mm_packs_epi16(_mm256_castsi256_si128(low), _mm256_extracti128_si256(low, 1)));
        }
    }
}

/* Each group's sum of x (G a multiple of 16), 8 values at a time. */
static void group_sums(const float *row, int64_t K, int64_t G, float *xg) {
    for (int64_t g = 0; g < K / G; g++) {
        __m256 sum = _mm256_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(row + k));
        xg[g] = hsum8(sum);
    }
}

#define QR_CHAINS 2 /* accumulator chains per activation row */

/* Block kb of one int4 weight row (q, c and x at block kb) into accumulator chain `chain`. */
static inline __attribute__((always_inline)) void int4_block(const int16_t *xq, int64_t K, const uint8_t *q,
                                                             const float *c, int64_t blocks, const int MT,
                                                             __m256 acc[][QR_CHAINS], const int chain) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
    const __m256i lo = _mm256_and_si256(b, _mm256_set1_epi16(0x0F)), hi = _mm256_srli_epi16(b, 4);
    for (int m = 0; m < MT; m++) {
        const int16_t *x = xq + m * K;
        const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                           _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 16))));
        acc[m][chain] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(c + m * blocks), acc[m][chain]);
    }
}

/* One int4 weight row against MT activation rows; c: the rows' block scale products [MT][blocks]. */
static inline __attribute__((always_inline)) void int4_row(const QActs *a, int64_t m0, const uint8_t *q,
                                                           const float *c, const float *mins, const int MT,
                                                           float *out) {
    const int64_t K = a->K, blocks = K / 32, groups = K / a->G;
    const int16_t *xq = a->xq + m0 * K;
    __m256 acc[4][QR_CHAINS];
    for (int m = 0; m < MT; m++)
        for (int j = 0; j < QR_CHAINS; j++) acc[m][j] = _mm256_setzero_ps();
    int64_t kb = 0;
    for (; kb + QR_CHAINS <= blocks; kb += QR_CHAINS)
        for (int j = 0; j < QR_CHAINS; j++) int4_block(xq + (kb + j) * 32, K, q + (kb + j) * 16, c + kb + j, blocks, MT, acc, j);
    for (; kb < blocks; kb++) int4_block(xq + kb * 32, K, q + kb * 16, c + kb, blocks, MT, acc, 0);
    for (int m = 0; m < MT; m++) { /* the min term, min x group sum of x, joins the accumulator's lanes */
        const float *xg = a->xg + (m0 + m) * groups;
        float tail = 0.0f;
        int64_t g = 0;
        for (; g + 8 <= groups; g += 8)
            acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(mins + g), _mm256_loadu_ps(xg + g), acc[m][1]);
        for (; g < groups; g++) tail += mins[g] * xg[g];
        out[m] = hsum8(_mm256_add_ps(acc[m][0], acc[m][1])) + tail;
    }
}

/* Block kb of one int8 weight row (x, q, clo and chi at block kb) into accumulator chain `chain`. */
static inline __attribute__((always_inline)) void int8_block(const int16_t *xq, int64_t K, const int8_t *q,
                                                             const float *clo, const float *chi, int64_t blocks,
                                                             const int halves, const int MT, __m256 acc[][QR_CHAINS],
                                                             const int chain) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
    for (int m = 0; m < MT; m++) {
        const int16_t *x = xq + m * K;
        const __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)x));
        const __m256i p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(x + 16)));
        if (halves) {
            acc[m][chain] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(clo + m * blocks), acc[m][chain]);
            acc[m][chain] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(chi + m * blocks), acc[m][chain]);
        } else {
            acc[m][chain] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)),
                                            _mm256_broadcast_ss(clo + m * blocks), acc[m][chain]);
        }
    }
}

/* One int8 weight row against MT activation rows; clo/chi: block scale products for values 0-15 / 16-31. */
static inline __attribute__((always_inline)) void int8_row(const QActs *a, int64_t m0, const int8_t *q,
                                                           const float *clo, const float *chi, const int halves,
                                                           const int MT, float *out) {
    const int64_t K = a->K, blocks = K / 32;
    const int16_t *xq = a->xq + m0 * K;
    __m256 acc[4][QR_CHAINS];
    for (int m = 0; m < MT; m++)
        for (int j = 0; j < QR_CHAINS; j++) acc[m][j] = _mm256_setzero_ps();
    int64_t kb = 0;
    for (; kb + QR_CHAINS <= blocks; kb += QR_CHAINS)
        for (int j = 0; j < QR_CHAINS; j++)
            int8_block(xq + (kb + j) * 32, K, q + (kb + j) * 32, clo + kb + j, chi + kb + j, blocks, halves, MT, acc, j);
    for (; kb < blocks; kb++) int8_block(xq + kb * 32, K, q + kb * 32, clo + kb, chi + kb, blocks, halves, MT, acc, 0);
    for (int m = 0; m < MT; m++)
        out[m] = hsum8(_mm256_add_ps(acc[m][0], acc[m][1]));
}
#else
#define QR_SIMD 0
#define QR_SPLIT 0
#define QR_TILES 0
#endif

/* Whether the tiles of `bits` read the split layout: int4's always, int8's where vpdpbusd takes them (the AVX2 int8
 * tiles widen the weights to int16 and read the int16 levels in natural order, with their block sums). */
static int tiles_read_split(int bits) {
    return QR_SPLIT || bits == 4;
}

#if QR_SIMD
/* n scales of one weight row (float16 or float32) -> float. */
static inline void scales_to_float(const void *src, int64_t n, int dtype, float *dst) {
    int64_t i = 0;
    if (dtype == FUSELM_F16) {
        const uint16_t *h = (const uint16_t *)src;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
        for (; i < n; i++) dst[i] = _cvtsh_ss(h[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* c[kb] = w[kb] * xs[kb] for every block, 8 at a time (a few dozen blocks a row: 256-bit steps in every variant). */
static inline void scale_products(const float *w, const float *xs, int64_t blocks, float *c) {
    int64_t kb = 0;
    for (; kb + 8 <= blocks; kb += 8)
        _mm256_storeu_ps(c + kb, _mm256_mul_ps(_mm256_loadu_ps(w + kb), _mm256_loadu_ps(xs + kb)));
    for (; kb < blocks; kb++) c[kb] = w[kb] * xs[kb];
}

/* Each block's weight scale (lo: values 0-15, hi: 16-31; equal unless G is 16) for one weight row. */
static inline void block_scales(const void *scales, int sdt, int64_t K, int64_t G, float *lo, float *hi) {
    const int64_t blocks = K / 32, groups = K / G;
    if (G == 32) {
        scales_to_float(scales, groups, sdt, lo);
        return;
    }
    float g[groups];
    scales_to_float(scales, groups, sdt, g);
    if (G == 16) {
        for (int64_t kb = 0; kb < blocks; kb++) lo[kb] = g[2 * kb], hi[kb] = g[2 * kb + 1];
        return;
    }
    const int64_t per_group = G / 32;
    for (int64_t i = 0; i < groups; i++)
        for (int64_t j = 0; j < per_group; j++) lo[i * per_group + j] = g[i];
}

/* Each 32-block's sum of one row's int16 levels (the AVX2 int8 tiles' correction for their biased weights). */
static void level_sums(const int16_t *q, int64_t K, int32_t *xv) {
    for (int64_t kb = 0; kb < K / 32; kb++) {
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) sum += q[kb * 32 + j];
        xv[kb] = sum;
    }
}

/* split_any_k: the split layout at any K % 32 == 0, for the tiles of int4_rows16.c and int8_rows16.c (they read
 * tails), not only K % 128 == 0 (what fuselm_qrows's int4 rows read) */
static int prepare(QActs *a, const float *x, int64_t ldx, int64_t M, int64_t K, int64_t G, int bits, int num_threads,
                   int split_any_k) {
    memset(a, 0, sizeof *a);
    /* a 32-block takes one scale (G a multiple of 32) or two (G = 16): an odd multiple of 16 such as 48
     * puts a group boundary inside a block, which only quant_linear.c's float path follows */
    if (K % 32 != 0 || K / 32 > QR_MAX_BLOCKS || (G != 16 && G % 32 != 0) || K % G != 0) return 0;
    const int64_t blocks = K / 32, groups = K / G;
    a->M = M, a->K = K, a->G = G, a->bits = bits;
    /* rows read the split layout where fuselm_qrows_read_split says, the tiles at any K % 32 == 0 where
     * tiles_read_split says (else the int16 one) */
    a->layout = fuselm_qrows_read_split(bits, K) || (QR_TILES && split_any_k && tiles_read_split(bits))
                    ? FUSELM_QACTS_SPLIT8
                    : FUSELM_QACTS_INT16;
    if (a->layout == FUSELM_QACTS_SPLIT8) {
        a->xh = (int8_t *)malloc((size_t)(M * K));
        a->xl = (int8_t *)malloc((size_t)(M * K));
        if (bits == 8) a->xv = (int32_t *)malloc((size_t)(M * blocks) * sizeof(int32_t));
    } else {
        a->xq = (int16_t *)malloc((size_t)(M * K) * sizeof(int16_t));
        if (bits == 8 && split_any_k) a->xv = (int32_t *)malloc((size_t)(M * blocks) * sizeof(int32_t));
    }
    a->xs = (float *)malloc((size_t)(M * blocks) * sizeof(float));
    a->xg = bits == 4 ? (float *)malloc((size_t)(M * groups) * sizeof(float)) : NULL;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M >= 8)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * ldx;
#if QR_TILES
        if (a->layout == FUSELM_QACTS_SPLIT8)
            prepare_row_split(row, K, a->xh + m * K, a->xl + m * K, a->xs + m * blocks,
                              a->xv != NULL ? a->xv + m * blocks : NULL);
        else
#endif
        {
            prepare_row16(row, K, bits, a->xq + m * K, a->xs + m * blocks);
            if (a->xv != NULL) level_sums(a->xq + m * K, K, a->xv + m * blocks);
        }
        if (bits == 4) group_sums(row, K, G, a->xg + m * groups);
    }
    return 1;
}

int fuselm_qacts_prepare(QActs *a, const float *x, int64_t ldx, int64_t M, int64_t K, int64_t G, int bits,
                         int num_threads) {
    return prepare(a, x, ldx, M, K, G, bits, num_threads, 0);
}

int fuselm_qacts_prepare_tiles(QActs *a, const float *x, int64_t ldx, int64_t M, int64_t K, int bits,
                               int num_threads) {
    if (!QR_TILES || (bits != 4 && bits != 8)) {
        memset(a, 0, sizeof *a);
        return 0;
    }
    return prepare(a, x, ldx, M, K, 32, bits, num_threads, 1);
}

static inline __attribute__((always_inline)) void rows_tile(const QActs *a, int64_t m0, const void *qweight,
                                                            const void *scales, const void *mins, int sdt, int64_t n0,
                                                            int64_t n1, float *y, int64_t ldy, const int MT) {
    const int64_t K = a->K, G = a->G, blocks = K / 32, groups = K / G;
    const int64_t scale_row = groups * (sdt == FUSELM_F16 ? 2 : 4);
    float wlo[blocks], whi[blocks], clo[MT * blocks], chi[MT * blocks], mn[groups], out[4];
    const int64_t row_bytes = a->bits == 4 ? K / 2 : K;
    for (int64_t n = n0; n < n1; n++) {
        /* one core alone does not keep enough misses in flight: each row asks for the row QR_PREFETCH_ROWS
         * on, the first one for the rows up to there as well */
        for (int64_t ahead = n == n0 ? n : n + QR_PREFETCH_ROWS; QR_PREFETCH && ahead <= n + QR_PREFETCH_ROWS && ahead < n1; ahead++) {
            for (int64_t i = 0; i < row_bytes; i += 64)
                _mm_prefetch((const char *)qweight + ahead * row_bytes + i, _MM_HINT_T0);
            /* the scales and mins are streams of their own, a cache line per 1,024 weights (g32, float16):
             * left to the hardware they missed at every row (half of a routed layer's time at one row) */
            for (int64_t i = 0; i < scale_row; i += 64) {
                _mm_prefetch((const char *)scales + ahead * scale_row + i, _MM_HINT_T0);
                if (mins != NULL) _mm_prefetch((const char *)mins + ahead * scale_row + i, _MM_HINT_T0);
            }
        }
        const char *row_scales = (const char *)scales + n * scale_row;
        const char *row_mins = mins != NULL ? (const char *)mins + n * scale_row : NULL;
#if QR_SPLIT
        if (a->layout == FUSELM_QACTS_SPLIT8) {
            if (G != 32) {
                block_scales(row_scales, sdt, K, G, wlo, whi);
                scales_to_float(row_mins, groups, sdt, mn);
            }
            int4_row_split(a, m0, (const uint8_t *)qweight + n * (K / 2), row_scales, row_mins, sdt, wlo, mn, MT, out);
            for (int m = 0; m < MT; m++) y[(m0 + m) * ldy + n] = out[m];
            continue;
        }
#endif
        block_scales(row_scales, sdt, K, G, wlo, whi);
        for (int m = 0; m < MT; m++) {
            scale_products(wlo, a->xs + (m0 + m) * blocks, blocks, clo + m * blocks);
            if (G == 16) scale_products(whi, a->xs + (m0 + m) * blocks, blocks, chi + m * blocks);
        }
        if (a->bits == 4) {
            scales_to_float(row_mins, groups, sdt, mn);
            int4_row(a, m0, (const uint8_t *)qweight + n * (K / 2), clo, mn, MT, out);
        } else if (G == 16) {
            int8_row(a, m0, (const int8_t *)qweight + n * K, clo, chi, 1, MT, out);
        } else {
            int8_row(a, m0, (const int8_t *)qweight + n * K, clo, clo, 0, MT, out);
        }
        for (int m = 0; m < MT; m++) y[(m0 + m) * ldy + n] = out[m];
    }
}

void fuselm_qrows(const QActs *a, int64_t m0, int64_t rows, const void *qweight, const void *scales, const void *mins,
                  int scale_dtype, int64_t n0, int64_t n1, float *y, int64_t ldy) {
    int64_t m = m0;
    for (; m + 4 <= m0 + rows; m += 4) rows_tile(a, m, qweight, scales, mins, scale_dtype, n0, n1, y, ldy, 4);
    switch (m0 + rows - m) {
    case 3: rows_tile(a, m, qweight, scales, mins, scale_dtype, n0, n1, y, ldy, 3); break;
    case 2: rows_tile(a, m, qweight, scales, mins, scale_dtype, n0, n1, y, ldy, 2); break;
    case 1: rows_tile(a, m, qweight, scales, mins, scale_dtype, n0, n1, y, ldy, 1); break;
    default: break;
    }
}
#else /* without AVX2 prepare declines, so callers never reach fuselm_qrows */
int fuselm_qacts_prepare(QActs *a, const float *x, int64_t ldx, int64_t M, int64_t K, int64_t G, int bits,
                         int num_threads) {
    (void)x, (void)ldx, (void)M, (void)K, (void)G, (void)bits, (void)num_threads;
    memset(a, 0, sizeof *a);
    return 0;
}

int fuselm_qacts_prepare_tiles(QActs *a, const float *x, int64_t ldx, int64_t M, int64_t K, int bits,
                               int num_threads) {
    (void)x, (void)ldx, (void)M, (void)K, (void)bits, (void)num_threads;
    memset(a, 0, sizeof *a);
    return 0;
}

void fuselm_qrows(const QActs *a, int64_t m0, int64_t rows, const void *qweight, const void *scales, const void *mins,
                  int scale_dtype, int64_t n0, int64_t n1, float *y, int64_t ldy) {
    (void)a, (void)m0, (void)rows, (void)qweight, (void)scales, (void)mins, (void)scale_dtype, (void)n0, (void)n1;
    (void)y, (void)ldy;
}
#endif

int fuselm_qacts_prepare_part(QActs *a, const QPart *w, const float *x, int64_t ldx, int64_t M, int num_threads) {
    if (w->scales == NULL) return fuselm_qacts_prepare_tiles(a, x, ldx, M, w->k, w->bits, num_threads);
    return fuselm_qacts_prepare(a, x, ldx, M, w->k, w->group, w->bits, num_threads);
}

int fuselm_qrows_read_split(int bits, int64_t K) {
    return QR_SPLIT && bits == 4 && K % 128 == 0;
}

int fuselm_qacts_fit(const QActs *a, const QPart *w) {
    if (a->layout == FUSELM_QACTS_NONE || a->bits != w->bits || a->G != w->group || a->K != w->k) return 0;
    /* tiles read the split layout where tiles_read_split says; rows where fuselm_qrows_read_split says; else the
     * int16 one */
    const int split = (w->scales == NULL && tiles_read_split(w->bits)) || fuselm_qrows_read_split(w->bits, w->k);
    return (a->layout == FUSELM_QACTS_SPLIT8) == split;
}

void fuselm_qacts_release(QActs *a) {
    free(a->xq), free(a->xh), free(a->xl), free(a->xs), free(a->xg), free(a->xv);
    memset(a, 0, sizeof *a);
}
