/* The shared pass of cascade attention (cascade_attention.c) as register-tiled matrix products: all the
 * M queries of a group and KV head against a span of shared keys, cut into panels of PANEL keys.
 *
 * Queries lie along the vector lanes (Qt [D, Mp], Mp = M rounded up to PL, the lanes of a register),
 * keys and dimensions are broadcast: a PL-query slice of a score S[t, q] = sum_d K[t, d] Qt[d, q] is
 * one FMA chain, and so is a slice of acc[d, q] += V[t, d] P[t, q]. In that layout the online
 * softmax is lane-wise (a query's max and sum over the panel's keys are element-wise max and add
 * over the keys' score rows), no horizontal sum is needed, and K and V are used row-major as the
 * cache stores them: a panel's rows are copied (widened from bf16, or int8 times its scale) into
 * kp / vp [PANEL, D] once for every query of the group, then
 *   1. scores: tiles of KT keys x RV PL-query slices (KT * RV accumulators) over d, per d RV loads of
 *      Qt and KT broadcasts of K;
 *   2. softmax: per query slice, the panel max, the correction exp(m_old - m_new), P = exp(S - m),
 *      the sum;
 *   3. P V: tiles of DT dimensions x RV slices (DT * RV accumulators), rescaled by the correction
 *      as they are loaded, over the panel's keys.
 * The tile shapes fill 24 of AVX-512's 32 zmm registers; with AVX2 the slices are 8 queries wide
 * (ymm) and the tiles 8 of its 16 registers. panel_span also runs a prompt chunk's own positions as one
 * causally masked panel (panel_softmax with a group) for chunk_attention.c. Header-only, included by
 * cascade_attention.c and chunk_attention.c.
 */
#ifndef FUSELM_CASCADE_PANEL_H
#define FUSELM_CASCADE_PANEL_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16_simd.h"
#include "cascade_blocks.h"
#include "fuselm_kernels.h"

#if defined(__AVX512F__)
#define PL 16 /* lanes of one query slice: a zmm register */
#define KT 8  /* keys of a score tile */
#define DT 8  /* dimensions of a P V tile */
#define RV 3  /* query slices of either tile */
#elif defined(__AVX2__)
#define PL 8 /* a ymm register */
#define KT 4
#define DT 4
#define RV 2
#else
#define PL 4 /* an xmm register */
#define KT 4
#define DT 4
#define RV 2
#endif
#define PANEL 64 /* keys multiplied together against every query; a multiple of KT */

typedef float pvec __attribute__((vector_size(PL * 4)));
typedef int32_t pveci __attribute__((vector_size(PL * 4)));

static inline pvec loadp(const float *p) {
    pvec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void storep(float *p, pvec v) { memcpy(p, &v, sizeof v); }

/* A paged KV cache as the panel path reads it: float32, bfloat16, or int8 with bf16 scales
 * [blocks, block_size, num_kv_heads] (k_scale / v_scale, else NULL). */
typedef struct {
    const void *k, *v;
    const uint16_t *k_scale, *v_scale;
    int dtype;
    int64_t num_kv_heads;
} PagedKv;

/* Per-thread scratch of the shared pass: Qt and acc [D, Mp], m and l [Mp], kp and vp [PANEL, D],
 * s [PANEL, RV * PL] (one row tile's scores, then its probabilities); ps [PANEL / 2, RV * PL] the probabilities
 * as bf16 pairs where the bf16 panels run (HAVE_BF16_PANELS, below), else unused (NULL). */
typedef struct {
    float *qt, *acc, *m, *l, *kp, *vp, *s;
    uint32_t *ps;
} PanelScratch;

/* Lanes of a where mask is set, of b elsewhere (mask: all ones or all zeros per lane). */
static inline pvec selectp(pveci mask, pvec a, pvec b) {
    pveci ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const pveci r = (ai & mask) | (bi & ~mask);
    pvec out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* The lane-wise maximum (vmaxps where there is one; a compare and select elsewhere). */
static inline pvec maxp(pvec a, pvec b) {
#if defined(__AVX512F__)
    return (pvec)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX2__)
    return (pvec)_mm256_max_ps((__m256)a, (__m256)b);
#else
    return selectp(a > b, a, b);
#endif
}

/* exp(x) for x <= 0 on PL lanes: exp_nonpositive's polynomial, with rounding to nearest done by adding
 * and subtracting 1.5 * 2^23 (exact for |x log2 e| < 2^22). */
static inline pvec expp_nonpositive(pvec x) {
    const pvec lo = {0}, magic = lo + 12582912.0f;
    x = maxp(x, lo - 87.0f);
    const pvec t = x * 1.44269504088896341f;
    const pvec n = (t + magic) - magic;
    const pvec f = t - n;
    pvec p = lo + 1.5403530393381609e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    const pveci bits = (__builtin_convertvector(n, pveci) + 127) << 23;
    pvec scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Copy `count` rows of KV head h (`count` keys from context position `first`, through the block
 * table) into dst [PANEL, D] as floats (an int8 row times its scale); rows count .. round-up to KT
 * are zeroed. */
static void pack_panel(const void *cache, const uint16_t *scales, int kv_dtype, const int64_t *table, int64_t first,
                       int64_t count, int64_t bs, int64_t h, int64_t Hkv, int64_t D, float *dst) {
    for (int64_t t = 0; t < count; t++) {
        const int64_t pos = first + t, slot = table[pos / bs] * bs + pos % bs, row = (slot * Hkv + h) * D;
        if (kv_dtype == FUSELM_F32) {
            memcpy(dst + t * D, (const float *)cache + row, sizeof(float) * (size_t)D);
        } else if (kv_dtype == FUSELM_I8) {
            const float s = bf16_to_f32(scales[slot * Hkv + h]);
            for (int64_t d = 0; d < D; d++) dst[t * D + d] = (float)((const int8_t *)cache)[row + d] * s;
        } else {
            for (int64_t d = 0; d < D; d++) dst[t * D + d] = bf16_to_f32(((const uint16_t *)cache)[row + d]);
        }
    }
    const int64_t padded = (count + KT - 1) / KT * KT;
    memset(dst + count * D, 0, sizeof(float) * (size_t)((padded - count) * D));
}

/* The K and V rows of KV head h at the next panel's context positions [first, first + count), asked for a few
 * keys per step of the current panel's score tiles (prefetch_spread.h's reasoning: the whole panel's 512 lines
 * at once left the copies of the next panel waiting on memory as if nothing had been asked for). */
typedef struct {
    PagedKv kv;
    const int64_t *table;
    int64_t first, count, bs, h, D;
    int64_t next, per_step; /* the next key to ask for; keys per step */
} PanelPrefetch;

static inline PanelPrefetch panel_prefetch(PagedKv kv, const int64_t *table, int64_t first, int64_t count, int64_t bs,
                                           int64_t h, int64_t D, int64_t steps) {
    PanelPrefetch pf = {kv, table, first, count, bs, h, D, 0, steps > 0 ? (count + steps - 1) / steps : count};
    return pf;
}

static inline void panel_prefetch_step(PanelPrefetch *pf) {
    if (pf == NULL) return;
    const int64_t width = pf->kv.dtype == FUSELM_F32 ? 4 : pf->kv.dtype == FUSELM_I8 ? 1 : 2;
    const int64_t end = pf->next + pf->per_step < pf->count ? pf->next + pf->per_step : pf->count;
    for (; pf->next < end; pf->next++) {
        const int64_t pos = pf->first + pf->next;
        const int64_t at = ((pf->table[pos / pf->bs] * pf->bs + pos % pf->bs) * pf->kv.num_kv_heads + pf->h) * pf->D * width;
        for (int64_t off = 0; off < pf->D * width; off += 64) {
            __builtin_prefetch((const char *)pf->kv.k + at + off, 0, 2);
            __builtin_prefetch((const char *)pf->kv.v + at + off, 0, 2);
        }
    }
}

/* The online-softmax step of R slices over `count` keys' scores in s: s becomes P = exp(s - new max),
 * m and l (from q0 on) move on, corr receives each query's factor for its old acc.
 * With group > 0 (a chunk's own positions, chunk_attention.c) query lane i from q0 on sees only the keys
 * t <= (q0 + i) / group: the panel holds the queries' own positions, `group` query heads per position,
 * queries in position order; masked keys take no part in the max and get P = 0. Every query sees key 0,
 * so its max is finite afterwards. */
static void panel_softmax(float *s, int64_t count, int R, float *m, float *l, float *corr, int64_t q0, int64_t group) {
    const pvec minus_inf = (pvec){0} - INFINITY, zero = {0};
    for (int r = 0; r < R; r++) {
        const pvec old = loadp(m + r * PL);
        pvec top = old, sum = {0};
        if (group == 0) {
            for (int64_t t = 0; t < count; t++) top = maxp(top, loadp(s + t * RV * PL + r * PL));
            for (int64_t t = 0; t < count; t++) {
                const pvec p = expp_nonpositive(loadp(s + t * RV * PL + r * PL) - top);
                storep(s + t * RV * PL + r * PL, p);
                sum += p;
            }
        } else {
            int32_t at[PL];
            for (int i = 0; i < PL; i++) at[i] = (int32_t)((q0 + r * PL + i) / group);
            pveci position;
            memcpy(&position, at, sizeof position);
            for (int64_t t = 0; t < count; t++)
                top = maxp(top, selectp(position >= (int32_t)t, loadp(s + t * RV * PL + r * PL), minus_inf));
            for (int64_t t = 0; t < count; t++) {
                const pveci seen = position >= (int32_t)t;
                const pvec p = selectp(seen, expp_nonpositive(loadp(s + t * RV * PL + r * PL) - top), zero);
                storep(s + t * RV * PL + r * PL, p);
                sum += p;
            }
        }
        const pvec c = expp_nonpositive(old - top);
        storep(corr + r * PL, c);
        storep(l + r * PL, loadp(l + r * PL) * c + sum);
        storep(m + r * PL, top);
    }
}

#if defined(__AVX512F__) && KT == 8 && DT == 8 && RV == 3
/* score_tiles and pv_tiles in 512-bit registers with named accumulators, for R (a constant where inlined) of the
 * RV slices: GCC kept 8 of the arrays' 24 accumulators on the stack (an FMA from memory and a store per k or t),
 * which held the shared pass at ~145 GFLOP/s of a 2-vCPU Zen 4 EPYC's ~217. Each output is the same FMA chain in
 * the same order, so the bits are the same. */
#define FT_ACC(k) __m512 a##k##0 = _mm512_setzero_ps(), a##k##1 = _mm512_setzero_ps(), a##k##2 = _mm512_setzero_ps();
#define FT_FMA(k, src)                                                                                              \
    {                                                                                                              \
        const __m512 b = _mm512_set1_ps(src);                                                                      \
        a##k##0 = _mm512_fmadd_ps(b, x0, a##k##0);                                                                 \
        if (R > 1) a##k##1 = _mm512_fmadd_ps(b, x1, a##k##1);                                                      \
        if (R > 2) a##k##2 = _mm512_fmadd_ps(b, x2, a##k##2);                                                      \
    }
#define FT_STORE(k, dst)                                                                                            \
    {                                                                                                              \
        _mm512_storeu_ps(dst, a##k##0);                                                                            \
        if (R > 1) _mm512_storeu_ps((dst) + PL, a##k##1);                                                          \
        if (R > 2) _mm512_storeu_ps((dst) + 2 * PL, a##k##2);                                                      \
    }
#define FT_SLICES(p)                                                                                                \
    const __m512 x0 = _mm512_loadu_ps(p), x1 = R > 1 ? _mm512_loadu_ps((p) + PL) : x0,                             \
                 x2 = R > 2 ? _mm512_loadu_ps((p) + 2 * PL) : x0;
#define FT_EACH(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
/* P V: dimension j's accumulators of the R slices, loaded from acc and rescaled by the softmax correction */
#define FT_LOAD(j)                                                                                                  \
    float *at##j = acc + (d0 + (j)) * Mp + q0;                                                                      \
    __m512 a##j##0 = _mm512_mul_ps(_mm512_loadu_ps(at##j), c0);                                                     \
    __m512 a##j##1 = R > 1 ? _mm512_mul_ps(_mm512_loadu_ps(at##j + PL), c1) : a##j##0;                              \
    __m512 a##j##2 = R > 2 ? _mm512_mul_ps(_mm512_loadu_ps(at##j + 2 * PL), c2) : a##j##0;

static inline __attribute__((always_inline)) void score_tiles_r(const float *qt, int64_t Mp, int64_t q0, const int R,
                                                                const float *kp, int64_t nk, int64_t D, float *s,
                                                                PanelPrefetch *pf) {
    for (int64_t t0 = 0; t0 < nk; t0 += KT) {
        panel_prefetch_step(pf);
        FT_EACH(FT_ACC)
        const float *key = kp + t0 * D;
        for (int64_t d = 0; d < D; d++) {
            FT_SLICES(qt + d * Mp + q0)
#define FT_KEY(k) FT_FMA(k, key[(k) * D + d])
            FT_EACH(FT_KEY)
#undef FT_KEY
        }
#define FT_OUT(k) FT_STORE(k, s + (t0 + (k)) * RV * PL)
        FT_EACH(FT_OUT)
#undef FT_OUT
    }
}

static inline __attribute__((always_inline)) void pv_tiles_r(float *acc, int64_t Mp, int64_t q0, const int R,
                                                             const float *s, int64_t count, const float *vp, int64_t D,
                                                             const float *corr) {
    const __m512 c0 = _mm512_loadu_ps(corr), c1 = R > 1 ? _mm512_loadu_ps(corr + PL) : c0,
                 c2 = R > 2 ? _mm512_loadu_ps(corr + 2 * PL) : c0;
    for (int64_t d0 = 0; d0 < D; d0 += DT) {
        FT_EACH(FT_LOAD)
        for (int64_t t = 0; t < count; t++) {
            const float *vt = vp + t * D + d0;
            FT_SLICES(s + t * RV * PL)
#define FT_V(j) FT_FMA(j, vt[j])
            FT_EACH(FT_V)
#undef FT_V
        }
#define FT_OUT(j) FT_STORE(j, at##j)
        FT_EACH(FT_OUT)
#undef FT_OUT
    }
}
#if defined(__AVX512BF16__)
/* The bf16 panels' tiles (the bf16 section below): the same accumulators, vdpbf16ps on pairs in place of FMAs. */
#define BT_DOT(k, pair)                                                                                             \
    {                                                                                                              \
        const __m512bh b = (__m512bh)_mm512_set1_epi32((int)(pair));                                               \
        a##k##0 = _mm512_dpbf16_ps(a##k##0, b, x0);                                                                \
        if (R > 1) a##k##1 = _mm512_dpbf16_ps(a##k##1, b, x1);                                                     \
        if (R > 2) a##k##2 = _mm512_dpbf16_ps(a##k##2, b, x2);                                                     \
    }
#define BT_SLICES(p)                                                                                                \
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(p),                                                           \
                   x1 = R > 1 ? (__m512bh)_mm512_loadu_si512((p) + PL) : x0,                                       \
                   x2 = R > 2 ? (__m512bh)_mm512_loadu_si512((p) + 2 * PL) : x0;

/* s[t, r * PL ..] = scale x scores of keys t < nk (a multiple of KT, kp [nk, D] bf16) for R slices from q0; qt holds
 * [D / 2, Mp] pairs of dimensions. */
static inline __attribute__((always_inline)) void score_tiles_bf16_r(const uint32_t *qt, int64_t Mp, int64_t q0,
                                                                     const int R, const uint16_t *kp, int64_t nk,
                                                                     int64_t D, float scale, float *s,
                                                                     PanelPrefetch *pf) {
    const __m512 sc = _mm512_set1_ps(scale);
    const int64_t half = D / 2;
    for (int64_t t0 = 0; t0 < nk; t0 += KT) {
        panel_prefetch_step(pf);
        FT_EACH(FT_ACC)
        const uint32_t *key = (const uint32_t *)(kp + t0 * D);
        for (int64_t d = 0; d < half; d++) {
            BT_SLICES(qt + d * Mp + q0)
#define BT_KEY(k) BT_DOT(k, key[(k) * half + d])
            FT_EACH(BT_KEY)
#undef BT_KEY
        }
#define BT_SCALE(k)                                                                                                 \
    a##k##0 = _mm512_mul_ps(a##k##0, sc), a##k##1 = _mm512_mul_ps(a##k##1, sc), a##k##2 = _mm512_mul_ps(a##k##2, sc);
        FT_EACH(BT_SCALE)
#undef BT_SCALE
#define FT_OUT(k) FT_STORE(k, s + (t0 + (k)) * RV * PL)
        FT_EACH(FT_OUT)
#undef FT_OUT
    }
}

/* acc[d, q0 ..] = acc * corr + sum over the pairs of keys (ps, vp: `pairs` of them) of V P, R slices. */
static inline __attribute__((always_inline)) void pv_tiles_bf16_r(float *acc, int64_t Mp, int64_t q0, const int R,
                                                                  const uint32_t *ps, int64_t pairs, const uint32_t *vp,
                                                                  int64_t D, const float *corr) {
    const __m512 c0 = _mm512_loadu_ps(corr), c1 = R > 1 ? _mm512_loadu_ps(corr + PL) : c0,
                 c2 = R > 2 ? _mm512_loadu_ps(corr + 2 * PL) : c0;
    for (int64_t d0 = 0; d0 < D; d0 += DT) {
        FT_EACH(FT_LOAD)
        for (int64_t t = 0; t < pairs; t++) {
            const uint32_t *vt = vp + t * D + d0;
            BT_SLICES(ps + t * RV * PL)
#define BT_V(j) BT_DOT(j, vt[j])
            FT_EACH(BT_V)
#undef BT_V
        }
#define FT_OUT(j) FT_STORE(j, at##j)
        FT_EACH(FT_OUT)
#undef FT_OUT
    }
}
#undef BT_DOT
#undef BT_SLICES
#endif
#undef FT_ACC
#undef FT_FMA
#undef FT_STORE
#undef FT_SLICES
#undef FT_EACH
#undef FT_LOAD

/* Not inlined into panel_span, whose softmax keeps its exp polynomial's constants in registers across the row
 * tiles: inlined there, GCC again spilled accumulators of the R = 3 tiles. */
static __attribute__((noinline)) void score_tiles(const float *qt, int64_t Mp, int64_t q0, int R, const float *kp,
                                                  int64_t nk, int64_t D, float *s, PanelPrefetch *pf) {
    if (R == 3)
        score_tiles_r(qt, Mp, q0, 3, kp, nk, D, s, pf);
    else if (R == 2)
        score_tiles_r(qt, Mp, q0, 2, kp, nk, D, s, pf);
    else
        score_tiles_r(qt, Mp, q0, 1, kp, nk, D, s, pf);
}

static __attribute__((noinline)) void pv_tiles(float *acc, int64_t Mp, int64_t q0, int R, const float *s,
                                               int64_t count, const float *vp, int64_t D, const float *corr) {
    if (R == 3)
        pv_tiles_r(acc, Mp, q0, 3, s, count, vp, D, corr);
    else if (R == 2)
        pv_tiles_r(acc, Mp, q0, 2, s, count, vp, D, corr);
    else
        pv_tiles_r(acc, Mp, q0, 1, s, count, vp, D, corr);
}
#else
/* s[t, r * PL ..] = scores of keys t < nk (a multiple of KT) for the R (a constant where inlined)
 * query slices from q0 on. */
static inline __attribute__((always_inline)) void score_tiles(const float *qt, int64_t Mp, int64_t q0, int R,
                                                              const float *kp, int64_t nk, int64_t D, float *s,
                                                              PanelPrefetch *pf) {
    for (int64_t t0 = 0; t0 < nk; t0 += KT) {
        panel_prefetch_step(pf);
        pvec a[KT][RV];
        for (int k = 0; k < KT; k++)
            for (int r = 0; r < R; r++) a[k][r] = (pvec){0};
        for (int64_t d = 0; d < D; d++) {
            pvec q[RV];
            for (int r = 0; r < R; r++) q[r] = loadp(qt + d * Mp + q0 + r * PL);
            for (int k = 0; k < KT; k++) {
                const float key = kp[(t0 + k) * D + d];
                for (int r = 0; r < R; r++) a[k][r] += key * q[r];
            }
        }
        for (int k = 0; k < KT; k++)
            for (int r = 0; r < R; r++) storep(s + (t0 + k) * RV * PL + r * PL, a[k][r]);
    }
}

/* acc[d, q0 + ..] = acc * corr + sum over keys t < count of V[t, d] P[t, ..] for R slices. */
static inline __attribute__((always_inline)) void pv_tiles(float *acc, int64_t Mp, int64_t q0, int R, const float *s,
                                                           int64_t count, const float *vp, int64_t D,
                                                           const float *corr) {
    for (int64_t d0 = 0; d0 < D; d0 += DT) {
        pvec a[DT][RV];
        for (int j = 0; j < DT; j++)
            for (int r = 0; r < R; r++) a[j][r] = loadp(acc + (d0 + j) * Mp + q0 + r * PL) * loadp(corr + r * PL);
        for (int64_t t = 0; t < count; t++) {
            pvec p[RV];
            for (int r = 0; r < R; r++) p[r] = loadp(s + t * RV * PL + r * PL);
            for (int j = 0; j < DT; j++) {
                const float v = vp[t * D + d0 + j];
                for (int r = 0; r < R; r++) a[j][r] += v * p[r];
            }
        }
        for (int j = 0; j < DT; j++)
            for (int r = 0; r < R; r++) storep(acc + (d0 + j) * Mp + q0 + r * PL, a[j][r]);
    }
}
#endif

/* One row tile (R slices from q0) against a packed panel of `count` keys. */
static inline __attribute__((always_inline)) void panel_tile(PanelScratch w, int64_t Mp, int64_t q0, int R,
                                                             int64_t count, int64_t D, float *corr, int64_t group,
                                                             PanelPrefetch *pf) {
    score_tiles(w.qt, Mp, q0, R, w.kp, (count + KT - 1) / KT * KT, D, w.s, pf);
    panel_softmax(w.s, count, R, w.m + q0, w.l + q0, corr, q0, group);
    pv_tiles(w.acc, Mp, q0, R, w.s, count, w.vp, D, corr);
}

/* to [d * Mp + i] = from [i * D + d] for i < M, 0 for M <= i < Mp: in slices of TRANSPOSE_ROWS rows, whose
 * D-float rows stay in L1 while each d writes one contiguous run of the slice (a straight loop over d for each
 * row went down one column of the [D, Mp] side a float at a time, a cache line each). A prompt chunk attending
 * as query rows transposes M = 512 rows x its KV group's queries: on a 2-vCPU Zen 4 EPYC, the embedded SmolLM2's
 * 2,048 / 4,096-token prompts 1.037x / 1.034x (in-process alternation, the same tokens). */
#define TRANSPOSE_ROWS 16
static void to_lanes(float *to, const float *from, int64_t M, int64_t Mp, int64_t D) {
    for (int64_t i0 = 0; i0 < Mp; i0 += TRANSPOSE_ROWS) {
        const int64_t i1 = i0 + TRANSPOSE_ROWS < Mp ? i0 + TRANSPOSE_ROWS : Mp;
        for (int64_t d = 0; d < D; d++)
            for (int64_t i = i0; i < i1; i++) to[d * Mp + i] = i < M ? from[i * D + d] : 0.0f;
    }
}

/* to [i * D + d] = from [d * Mp + i] for i < M: to_lanes' inverse, in the same slices. */
static void from_lanes(float *to, const float *from, int64_t M, int64_t Mp, int64_t D) {
    for (int64_t i0 = 0; i0 < M; i0 += TRANSPOSE_ROWS) {
        const int64_t i1 = i0 + TRANSPOSE_ROWS < M ? i0 + TRANSPOSE_ROWS : M;
        for (int64_t d = 0; d < D; d++)
            for (int64_t i = i0; i < i1; i++) to[i * D + d] = from[d * Mp + i];
    }
}

/* The lanes' state (w.qt, w.acc, w.m, w.l: Mp queries of KV head h) over context positions [first, end) of a block
 * table of block size bs: with group 0 in panels every query sees whole; with group > 0 the queries' own
 * positions, one panel of at most PANEL keys, query lane i seeing keys up to its own position first + i / group
 * (chunk_attention.c). */
static void panel_span(PanelScratch w, int64_t Mp, PagedKv kv, const int64_t *table, int64_t bs, int64_t first,
                       int64_t end, int64_t h, int64_t D, int64_t group) {
    float corr[RV * PL];
    for (int64_t p0 = first; p0 < end; p0 += PANEL) {
        const int64_t count = end - p0 < PANEL ? end - p0 : PANEL;
        pack_panel(kv.k, kv.k_scale, kv.dtype, table, p0, count, bs, h, kv.num_kv_heads, D, w.kp);
        pack_panel(kv.v, kv.v_scale, kv.dtype, table, p0, count, bs, h, kv.num_kv_heads, D, w.vp);
        /* the next panel's rows, spread over this one's key steps (row tiles x key tiles) */
        const int64_t next = p0 + PANEL < end ? (end - p0 - PANEL < PANEL ? end - p0 - PANEL : PANEL) : 0;
        PanelPrefetch pf = panel_prefetch(kv, table, p0 + PANEL, next, bs, h, D,
                                          (Mp + RV * PL - 1) / (RV * PL) * ((count + KT - 1) / KT));
        for (int64_t q0 = 0; q0 < Mp; q0 += RV * PL) {
            const int64_t slices = (Mp - q0) / PL;
            const int R = slices >= RV ? RV : (int)slices;
            /* causal: keys past the row tile's last position are masked for all its queries, so not computed */
            const int64_t last = group > 0 ? (q0 + R * PL - 1) / group + 1 : count;
            const int64_t seen = last < count ? last : count;
            if (R == RV) panel_tile(w, Mp, q0, RV, seen, D, corr, group, &pf);
#if RV > 1
            else if (R == 1) panel_tile(w, Mp, q0, 1, seen, D, corr, group, &pf);
#endif
#if RV > 2
            else panel_tile(w, Mp, q0, 2, seen, D, corr, group, &pf);
#endif
        }
    }
}

/* The lanes' softmax state (w.acc [D, Mp], w.m, w.l) from st's M queries, or empty where fresh (st not read). */
static void state_to_lanes(PanelScratch w, State st, int64_t M, int64_t Mp, int64_t D, int fresh) {
    if (fresh)
        memset(w.acc, 0, sizeof(float) * (size_t)(D * Mp));
    else
        to_lanes(w.acc, st.acc, M, Mp, D);
    for (int64_t i = 0; i < Mp; i++) {
        w.m[i] = i < M && !fresh ? st.m[i] : -INFINITY;
        w.l[i] = i < M && !fresh ? st.l[i] : 0.0f;
    }
}

/* st's M queries from the lanes' state: state_to_lanes' inverse. */
static void state_from_lanes(State st, PanelScratch w, int64_t M, int64_t Mp, int64_t D) {
    for (int64_t i = 0; i < M; i++) st.m[i] = w.m[i], st.l[i] = w.l[i];
    from_lanes(st.acc, w.acc, M, Mp, D);
}

/* Continue the state st of M queries Q [M, D] (pre-scaled) of KV head h over context positions
 * [first, end) of one block table; fresh: st holds nothing yet (it is written, not read). */
static void shared_span(const float *Q, int64_t M, State st, PagedKv kv, const int64_t *table, int64_t first,
                        int64_t end, int64_t h, int64_t D, int64_t bs, PanelScratch w, int fresh) {
    const int64_t Mp = (M + PL - 1) / PL * PL;
    to_lanes(w.qt, Q, M, Mp, D);
    state_to_lanes(w, st, M, Mp, D, fresh);
    panel_span(w, Mp, kv, table, bs, first, end, h, D, 0);
    state_from_lanes(st, w, M, Mp, D);
}

#if defined(__AVX512BF16__) && KT == 8 && DT == 8 && RV == 3
#define HAVE_BF16_PANELS 1
/* The shared pass for bf16 queries over a bf16 cache by vdpbf16ps: each instruction multiplies pairs of bf16
 * and adds both products to a float lane, 32 products where an FMA does 16, at the FMA's rate (Zen 4: one zmm
 * either way). The layout is the float pass's with pairs in each 32-bit lane:
 *   scores: Qt as [D / 2, Mp] pairs of dimensions (d, d + 1), a key's pair broadcast straight from its cached
 *           row, so K is only copied into kp [keys, D] as it is stored;
 *   P V:    P as [keys / 2, RV * PL] pairs of keys (t, t + 1) after the float softmax, rounded to bf16 as
 *           FlashAttention rounds P for its second product; V as [keys / 2, D] pairs of the same keys.
 * Sums and the online softmax state stay float32. The queries enter unscaled, as the model wrote them; the
 * scale multiplies each score as it is stored. Needs D % 32 == 0. */

/* The permutex2var index pairing words from + i of two 32-word vectors a and b (lo from a, hi from b) in lane i:
 * from = 0 pairs words 0 .. 15, from = 16 words 16 .. 31. */
static inline __m512i word_pairs_index(int from) {
    uint16_t index[32];
    for (int i = 0; i < 16; i++) index[2 * i] = (uint16_t)(from + i), index[2 * i + 1] = (uint16_t)(32 + from + i);
    return _mm512_loadu_si512(index);
}

/* K rows of head h at positions [first, first + count) into dst [KT-padded count, D] bf16, the padding zeroed. */
static void pack_keys_bf16(const uint16_t *cache, const int64_t *table, int64_t first, int64_t count, int64_t bs,
                           int64_t h, int64_t Hkv, int64_t D, uint16_t *dst) {
    for (int64_t t = 0; t < count; t++) {
        const int64_t pos = first + t, slot = table[pos / bs] * bs + pos % bs;
        memcpy(dst + t * D, cache + (slot * Hkv + h) * D, sizeof(uint16_t) * (size_t)D);
    }
    const int64_t padded = (count + KT - 1) / KT * KT;
    memset(dst + count * D, 0, sizeof(uint16_t) * (size_t)((padded - count) * D));
}

/* V rows of head h at positions [first, first + count) into dst [ceil(count / 2), D] pairs (V[t, d], V[t + 1, d]);
 * an odd count's last pair has 0 for its second key. */
static void pack_values_bf16(const uint16_t *cache, const int64_t *table, int64_t first, int64_t count, int64_t bs,
                             int64_t h, int64_t Hkv, int64_t D, uint32_t *dst) {
    const __m512i low = word_pairs_index(0), high = word_pairs_index(16);
    for (int64_t t = 0; t < count; t += 2) {
        const int64_t pa = first + t, pb = pa + 1;
        const uint16_t *a = cache + ((table[pa / bs] * bs + pa % bs) * Hkv + h) * D;
        const uint16_t *b = t + 1 < count ? cache + ((table[pb / bs] * bs + pb % bs) * Hkv + h) * D : NULL;
        for (int64_t d0 = 0; d0 < D; d0 += 32) {
            const __m512i va = _mm512_loadu_si512(a + d0), vb = b != NULL ? _mm512_loadu_si512(b + d0)
                                                                           : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + (t / 2) * D + d0, _mm512_permutex2var_epi16(va, low, vb));
            _mm512_storeu_si512(dst + (t / 2) * D + d0 + 16, _mm512_permutex2var_epi16(va, high, vb));
        }
    }
}

/* qt [D / 2, Mp] pairs of dimensions from Q [M, D] bf16, lanes M .. Mp zero; in to_lanes' slices of rows. */
static void to_lane_pairs(uint32_t *qt, const uint16_t *Q, int64_t M, int64_t Mp, int64_t D) {
    for (int64_t i0 = 0; i0 < Mp; i0 += TRANSPOSE_ROWS) {
        const int64_t i1 = i0 + TRANSPOSE_ROWS < Mp ? i0 + TRANSPOSE_ROWS : Mp;
        for (int64_t d = 0; d < D; d += 2)
            for (int64_t i = i0; i < i1; i++)
                qt[(d / 2) * Mp + i] = i < M ? (uint32_t)Q[i * D + d] | (uint32_t)Q[i * D + d + 1] << 16 : 0;
    }
}

/* ps [ceil(count / 2), RV * PL] = R slices of the probabilities s [count, RV * PL] as bf16 pairs of keys (an odd
 * count's last pair 0 for its second key), rounded to nearest even. */
static void probabilities_to_pairs(const float *s, int64_t count, int R, uint32_t *ps) {
    uint16_t order[32];
    for (int i = 0; i < 16; i++) order[2 * i] = (uint16_t)i, order[2 * i + 1] = (uint16_t)(16 + i);
    const __m512i index = _mm512_loadu_si512(order);
    for (int64_t t = 0; t < count; t += 2)
        for (int r = 0; r < R; r++) {
            const __m512 a = _mm512_loadu_ps(s + t * RV * PL + r * PL);
            const __m512 b = t + 1 < count ? _mm512_loadu_ps(s + (t + 1) * RV * PL + r * PL) : _mm512_setzero_ps();
            const __m512i words = (__m512i)_mm512_cvtne2ps_pbh(b, a); /* a's 16 words, then b's */
            _mm512_storeu_si512(ps + (t / 2) * RV * PL + r * PL, _mm512_permutexvar_epi16(index, words));
        }
}

/* Not inlined into their caller, as score_tiles and pv_tiles (the accumulators stay in registers). */
static __attribute__((noinline)) void score_tiles_bf16(const uint32_t *qt, int64_t Mp, int64_t q0, int R,
                                                       const uint16_t *kp, int64_t nk, int64_t D, float scale, float *s,
                                                       PanelPrefetch *pf) {
    if (R == 3)
        score_tiles_bf16_r(qt, Mp, q0, 3, kp, nk, D, scale, s, pf);
    else if (R == 2)
        score_tiles_bf16_r(qt, Mp, q0, 2, kp, nk, D, scale, s, pf);
    else
        score_tiles_bf16_r(qt, Mp, q0, 1, kp, nk, D, scale, s, pf);
}

static __attribute__((noinline)) void pv_tiles_bf16(float *acc, int64_t Mp, int64_t q0, int R, const uint32_t *ps,
                                                    int64_t pairs, const uint32_t *vp, int64_t D, const float *corr) {
    if (R == 3)
        pv_tiles_bf16_r(acc, Mp, q0, 3, ps, pairs, vp, D, corr);
    else if (R == 2)
        pv_tiles_bf16_r(acc, Mp, q0, 2, ps, pairs, vp, D, corr);
    else
        pv_tiles_bf16_r(acc, Mp, q0, 1, ps, pairs, vp, D, corr);
}

/* panel_span on the bf16 panels: the lanes' state (w.qt as [D / 2, Mp] pairs, w.acc, w.m, w.l) over context positions
 * [first, end), scores times `scale`; group as panel_span's (0: every query sees every key; > 0: a chunk's own
 * positions, causally). w.kp holds a panel's K [PANEL, D] bf16, w.vp its V in pairs of keys [PANEL / 2, D]. */
static void panel_span_bf16(PanelScratch w, int64_t Mp, PagedKv kv, const int64_t *table, int64_t bs, int64_t first,
                            int64_t end, int64_t h, int64_t D, int64_t group, float scale) {
    const uint32_t *qt = (const uint32_t *)w.qt;
    uint32_t *vp = (uint32_t *)w.vp;
    uint16_t *kp = (uint16_t *)w.kp;
    float corr[RV * PL];
    for (int64_t p0 = first; p0 < end; p0 += PANEL) {
        const int64_t count = end - p0 < PANEL ? end - p0 : PANEL;
        pack_keys_bf16((const uint16_t *)kv.k, table, p0, count, bs, h, kv.num_kv_heads, D, kp);
        pack_values_bf16((const uint16_t *)kv.v, table, p0, count, bs, h, kv.num_kv_heads, D, vp);
        const int64_t next = p0 + PANEL < end ? (end - p0 - PANEL < PANEL ? end - p0 - PANEL : PANEL) : 0;
        PanelPrefetch pf = panel_prefetch(kv, table, p0 + PANEL, next, bs, h, D,
                                          (Mp + RV * PL - 1) / (RV * PL) * ((count + KT - 1) / KT));
        for (int64_t q0 = 0; q0 < Mp; q0 += RV * PL) {
            const int64_t slices = (Mp - q0) / PL;
            const int R = slices >= RV ? RV : (int)slices;
            /* causal: keys past the row tile's last position are masked for all its queries, so not computed */
            const int64_t last = group > 0 ? (q0 + R * PL - 1) / group + 1 : count;
            const int64_t seen = last < count ? last : count;
            score_tiles_bf16(qt, Mp, q0, R, kp, (seen + KT - 1) / KT * KT, D, scale, w.s, &pf);
            panel_softmax(w.s, seen, R, w.m + q0, w.l + q0, corr, q0, group);
            probabilities_to_pairs(w.s, seen, R, w.ps);
            pv_tiles_bf16(w.acc, Mp, q0, R, w.ps, (seen + 1) / 2, vp, D, corr);
        }
    }
}

/* The state st of M bf16 queries Qb [M, D] (unscaled; scale multiplies the scores) of KV head h over context
 * positions [first, end) of one block table, on the bf16 panels (st is written, not read). */
static void shared_span_bf16(const uint16_t *Qb, int64_t M, float scale, State st, PagedKv kv, const int64_t *table,
                             int64_t first, int64_t end, int64_t h, int64_t D, int64_t bs, PanelScratch w) {
    const int64_t Mp = (M + PL - 1) / PL * PL;
    to_lane_pairs((uint32_t *)w.qt, Qb, M, Mp, D);
    state_to_lanes(w, st, M, Mp, D, 1);
    panel_span_bf16(w, Mp, kv, table, bs, first, end, h, D, 0, scale);
    state_from_lanes(st, w, M, Mp, D);
}
#endif

#endif
