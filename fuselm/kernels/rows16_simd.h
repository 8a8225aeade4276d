/* Helpers of the sixteen-row tile kernels (int4_rows16.c, int8_rows16.c), for AVX-512 builds with F16C: sixteen
 * rows' scales (float16 or float32) as floats, and four activation bytes broadcast to every int32 lane.
 * Header-only; included inside each kernel's AVX512_VNNI block. */
#ifndef FUSELM_ROWS16_SIMD_H
#define FUSELM_ROWS16_SIMD_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "fuselm_kernels.h"

static inline __m512 load_16(const uint8_t *p, int sdt) {
    if (sdt == FUSELM_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_loadu_ps((const float *)p);
}

static inline __m512i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}
#endif
