/* exp for softmax after max subtraction, shared by the per-row and shared-prefix attention kernels. */
#ifndef FUSELM_SOFTMAX_EXP_H
#define FUSELM_SOFTMAX_EXP_H

#include <math.h>
#include <stdint.h>

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

#endif
