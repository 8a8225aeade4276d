/* exp for softmax after max subtraction, and the empty online-softmax state, shared by the per-row and
 * shared-prefix attention kernels. */
#ifndef FUSELM_SOFTMAX_EXP_H
#define FUSELM_SOFTMAX_EXP_H

#include <math.h>
#include <stdint.h>

/* Online-softmax state of one sequence before its first block: V sums 0, running max -inf, sum 0. */
static inline void reset_softmax(float *acc, float *m, float *l, int64_t num_heads, int64_t head_dim) {
    for (int64_t i = 0; i < num_heads * head_dim; i++) acc[i] = 0.0f;
    for (int64_t j = 0; j < num_heads; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
}

/* exp(x) for x <= 0 (softmax after max subtraction): 2^(x log2 e) split into 2^n * 2^f with
 * f in [-0.5, 0.5], 2^f by its degree-6 Taylor polynomial (relative error ~2e-7). Plain
 * arithmetic, so loops over it vectorise, unlike libm's expf. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    const float n = rintf(t);
    const float f = t - n;
    float p = 1.5403530393381609e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * scale.f;
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* exp_nonpositive on 16 lanes: the same clamp, split and polynomial. */
static inline __m512 exp512_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530393381609e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#include "bf16_simd.h" /* tail_mask */
/* The online-softmax update of one block's scores for one query head, 16 lanes at a time: sj[skip ..
 * count - 1] become exp(s - new max) in place (the lanes outside, maybe NaN where the context does not
 * reach, are masked to 0); *m and *l take the new running max and sum. Returns the factor that rescales
 * what was accumulated before this block. */
static inline float softmax_block_update16(float *sj, int64_t count, int64_t skip, float *m, float *l) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t t0 = 0; t0 < count; t0 += 16)
        vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY),
                                                         tail_mask(count - t0) & ~tail_mask(skip - t0), sj + t0));
    const float block_max = _mm512_reduce_max_ps(vmax);
    const float new_max = block_max > *m ? block_max : *m;
    const float correction = exp_nonpositive(*m - new_max);
    const __m512 vnew = _mm512_set1_ps(new_max);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < count; t0 += 16) {
        const __mmask16 mask = tail_mask(count - t0) & ~tail_mask(skip - t0);
        const __m512 e = _mm512_maskz_mov_ps(mask, exp512_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sj + t0), vnew)));
        _mm512_storeu_ps(sj + t0, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    *l = *l * correction + _mm512_reduce_add_ps(vsum);
    *m = new_max;
    return correction;
}
#endif

#endif
