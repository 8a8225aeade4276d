/* Helpers of the sixteen-row tile kernels (int4_rows16.c, int8_rows16.c): where a block lies in the split
 * activations, and for AVX-512 builds with F16C (sixteen rows' scales as floats, four activation bytes broadcast to
 * every int32 lane) and AVX2 ones (eight rows' scales, the same broadcasts to eight lanes). Header-only; included inside each kernel's AVX512_VNNI or AVX2 block. */
#ifndef FUSELM_ROWS16_SIMD_H
#define FUSELM_ROWS16_SIMD_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "fuselm_kernels.h"

/* Where block kb of `blocks` keeps its values 0-15 in the split activations (quads of four blocks: values 0-15 of
 * each, then their values 16-31), and in *high how far on its values 16-31 are (16 per block of its quad). */
static inline int64_t split_block(int64_t kb, int64_t blocks, int64_t *high) {
    const int64_t in_quad = blocks - (kb / 4) * 4 < 4 ? blocks - (kb / 4) * 4 : 4;
    *high = 16 * in_quad;
    return (kb / 4) * 128 + (kb % 4) * 16;
}

#if defined(__AVX512F__)
static inline __m512 load_16(const uint8_t *p, int sdt) {
    if (sdt == FUSELM_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_loadu_ps((const float *)p);
}

static inline __m512i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}
#else
static inline __m256 load_8(const uint8_t *p, int sdt) {
    if (sdt == FUSELM_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    return _mm256_loadu_ps((const float *)p);
}

static inline __m256i broadcast4_8(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm256_set1_epi32(v);
}

/* Four activation bytes broadcast to every int32 lane, loaded where the asm stands: as a plain broadcast GCC loaded
 * a block's broadcasts for several rows up front and kept them on the stack. */
static inline __m256i load_broadcast4(const int8_t *p) {
    typedef int32_t __attribute__((may_alias)) int32_alias;
    __m256i r;
    __asm__ volatile("vpbroadcastd %1, %0" : "=x"(r) : "m"(*(const int32_alias *)p));
    return r;
}
#endif
#endif
