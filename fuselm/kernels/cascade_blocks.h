/* One cache block's part of shared-prefix attention (cascade_attention.c) for M queries of one KV head:
 * the scores (a matrix product against a loaded key tile when M is large, dot products when small;
 * float, or vdpbf16ps for bf16 queries over a bf16 cache), the online-softmax update and the P V
 * accumulation. Header-only, included by cascade_attention.c alone. The vector type is GCC's generic
 * vector extension, lowered to the widest registers the build's ISA variant has (one zmm with
 * AVX-512, two ymm with AVX2).
 */
#ifndef FUSELM_CASCADE_BLOCKS_H
#define FUSELM_CASCADE_BLOCKS_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16_simd.h"
#include "fuselm_kernels.h"
#include "softmax_exp.h"

typedef float v16f __attribute__((vector_size(64)));
/* Only static functions pass v16f by value, so the psABI note GCC gives for 64-byte vectors in
 * builds without AVX-512 concerns no interface. */
#pragma GCC diagnostic ignored "-Wpsabi"
/* ISO C mode (-std=c11) turns off contracting a * b + c into one FMA; the vector loops need it. */
#pragma GCC optimize("fp-contract=fast")

#define LANES 16
#define ROW_BLOCK 8       /* queries multiplied together against one loaded tile of K or V */
#define PANEL_MIN_ROWS 8  /* from this many queries on, K is transposed per block (see block_scores) */

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, v16f v) { memcpy(p, &v, sizeof v); }

typedef int32_t v16i __attribute__((vector_size(64)));

/* The sum of a vector's 16 lanes, by halving it four times. */
static inline float lane_sum(v16f v) {
    v += __builtin_shuffle(v, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v += __builtin_shuffle(v, (v16i){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v += __builtin_shuffle(v, (v16i){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return v[0];
}

/* Online-softmax state of M queries: running max m, running sum l, unnormalised output acc [M, D]. */
typedef struct {
    float *m, *l, *acc;
} State;

static void reset_state(State s, int64_t M, int64_t D) {
    for (int64_t i = 0; i < M; i++) {
        s.m[i] = -INFINITY;
        s.l[i] = 0.0f;
    }
    memset(s.acc, 0, sizeof(float) * (size_t)(M * D));
}

/* Fold state `src` into `dst` (the exact merge of two partial softmaxes over disjoint keys). */
static void merge_state(State dst, int64_t di, State src, int64_t si, int64_t D) {
    const float m = src.m[si] > dst.m[di] ? src.m[si] : dst.m[di];
    if (m == -INFINITY) return; /* both empty */
    const float a = exp_nonpositive(dst.m[di] - m), b = exp_nonpositive(src.m[si] - m);
    dst.l[di] = dst.l[di] * a + src.l[si] * b;
    dst.m[di] = m;
    float *x = dst.acc + di * D;
    const float *y = src.acc + si * D;
    for (int64_t d = 0; d < D; d++) x[d] = x[d] * a + y[d] * b;
}

/* One KV head's rows (key or value) of `count` tokens of a cache block as floats, head h's columns
 * only: a float32 cache is read in place (rows *stride apart), a bfloat16 one widened into `scratch`
 * (stride D), once per block for all the queries that read it. */
static const float *head_rows(const void *cache, int kv_dtype, int64_t first_row, int64_t h, int64_t row_elems,
                              int64_t count, int64_t D, float *scratch, int64_t *stride) {
    if (kv_dtype == FUSELM_F32) {
        *stride = row_elems;
        return (const float *)cache + first_row * row_elems + h * D;
    }
    const uint16_t *src = (const uint16_t *)cache + first_row * row_elems + h * D;
    for (int64_t t = 0; t < count; t++)
        for (int64_t d = 0; d < D; d++) scratch[t * D + d] = bf16_to_f32(src[t * row_elems + d]);
    *stride = D;
    return scratch;
}

/* S[i, t] = Q[i] . K[t] for M queries (Q [M, D], pre-scaled) and `count` keys (rows of K, `ks` apart;
 * the block holds rows up to the next multiple of 16, which may be read: their scores are never used).
 * Few queries: dot products, 16 keys at a time summed with one shuffle tree (AVX-512). Many: K is
 * transposed into kt [D, count rounded up to 16] once and each 16-key row of it is multiplied against
 * ROW_BLOCK broadcast queries, which reuses every loaded key ROW_BLOCK times (the matrix-matrix form
 * that makes reading a block once pay). */
static void block_scores(const float *Q, int64_t M, const float *K, int64_t ks, int64_t count, int64_t D, float *S,
                         int64_t lds, float *kt) {
    const int64_t ldk = (count + LANES - 1) / LANES * LANES;
    if (M < PANEL_MIN_ROWS) {
        for (int64_t i = 0; i < M; i++) {
            const float *qi = Q + i * D;
#if defined(__AVX512F__)
            for (int64_t t0 = 0; t0 < count; t0 += LANES) {
                __m512 part[LANES];
                for (int t = 0; t < LANES; t++) {
                    v16f a = load16(qi) * load16(K + (t0 + t) * ks);
                    for (int64_t d = LANES; d < D; d += LANES) a += load16(qi + d) * load16(K + (t0 + t) * ks + d);
                    part[t] = (__m512)a;
                }
                store16(S + i * lds + t0, (v16f)hsum16(part));
            }
#else
            for (int64_t t = 0; t < count; t++) {
                v16f a = {0};
                for (int64_t d = 0; d < D; d += LANES) a += load16(qi + d) * load16(K + t * ks + d);
                S[i * lds + t] = lane_sum(a);
            }
#endif
        }
        return;
    }
    for (int64_t t = 0; t < count; t++)
        for (int64_t d = 0; d < D; d++) kt[d * ldk + t] = K[t * ks + d];
    for (int64_t t0 = 0; t0 < count; t0 += LANES) {
        int64_t i = 0;
        for (; i + ROW_BLOCK <= M; i += ROW_BLOCK) {
            v16f a[ROW_BLOCK] = {{0}};
            for (int64_t d = 0; d < D; d++) {
                const v16f k = load16(kt + d * ldk + t0);
                for (int r = 0; r < ROW_BLOCK; r++) a[r] += Q[(i + r) * D + d] * k;
            }
            for (int r = 0; r < ROW_BLOCK; r++) store16(S + (i + r) * lds + t0, a[r]);
        }
        for (; i < M; i++) {
            v16f a = {0};
            for (int64_t d = 0; d < D; d++) a += Q[i * D + d] * load16(kt + d * ldk + t0);
            store16(S + i * lds + t0, a);
        }
    }
}

/* acc[i .. i + R) += P V for R (a constant where inlined) queries, one 16-wide slice of V at a time:
 * each loaded slice of a V row feeds R independent accumulators. */
static inline __attribute__((always_inline)) void add_pv(float *acc, int64_t i, int R, const float *P, int64_t ldp,
                                                         int64_t count, const float *V, int64_t vs, int64_t D) {
    for (int64_t c = 0; c < D; c += LANES) {
        v16f a[ROW_BLOCK];
        for (int r = 0; r < R; r++) a[r] = load16(acc + (i + r) * D + c);
        for (int64_t t = 0; t < count; t++) {
            const v16f v = load16(V + t * vs + c);
            for (int r = 0; r < R; r++) a[r] += P[(i + r) * ldp + t] * v;
        }
        for (int r = 0; r < R; r++) store16(acc + (i + r) * D + c, a[r]);
    }
}

/* add_pv for R <= 6 queries and head_dim = 16 * DC (both constants where inlined, R * DC <= 24): every
 * accumulator of the R rows stays in a register through the block, so the FMAs of one V row are
 * R * DC independent chains (a row's few accumulators alone would wait on the FMA latency). */
static inline __attribute__((always_inline)) void add_pv_small(float *acc, int64_t i, int R, int DC, const float *P,
                                                               int64_t ldp, int64_t count, const float *V,
                                                               int64_t vs) {
    v16f a[6][8];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < DC; c++) a[r][c] = load16(acc + (i + r) * DC * LANES + c * LANES);
    for (int64_t t = 0; t < count; t++)
        for (int c = 0; c < DC; c++) {
            const v16f v = load16(V + t * vs + c * LANES);
            for (int r = 0; r < R; r++) a[r][c] += P[(i + r) * ldp + t] * v;
        }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < DC; c++) store16(acc + (i + r) * DC * LANES + c * LANES, a[r][c]);
}

/* The online-softmax step for `count` new scores of each of M queries: S becomes exp(S - new max),
 * l and acc are rescaled to the new max, then acc += P V (V rows `vs` apart). */
static void block_update(State st, int64_t M, float *S, int64_t lds, int64_t count, const float *V, int64_t vs,
                         int64_t D) {
    const int64_t padded = (count + LANES - 1) / LANES * LANES;
    for (int64_t i = 0; i < M; i++) {
        float *s = S + i * lds;
        float block_max = s[0];
        for (int64_t t = 1; t < count; t++) block_max = s[t] > block_max ? s[t] : block_max;
        const float new_max = block_max > st.m[i] ? block_max : st.m[i];
        const float correction = exp_nonpositive(st.m[i] - new_max);
#pragma omp simd
        for (int64_t t = 0; t < count; t++) s[t] = exp_nonpositive(s[t] - new_max);
        for (int64_t t = count; t < padded; t++) s[t] = 0.0f;
        v16f sum = load16(s);
        for (int64_t t0 = LANES; t0 < count; t0 += LANES) sum += load16(s + t0);
        st.l[i] = st.l[i] * correction + lane_sum(sum);
        st.m[i] = new_max;
        if (correction != 1.0f) {
            float *a = st.acc + i * D;
            for (int64_t d = 0; d < D; d += LANES) store16(a + d, load16(a + d) * correction);
        }
    }
    if (M <= 3 && (D == 64 || D == 128)) { /* a row's own blocks: its query heads of one KV head */
#define PV_SMALL(R)                                                                                          \
    (D == 64 ? add_pv_small(st.acc, 0, R, 4, S, lds, count, V, vs) : add_pv_small(st.acc, 0, R, 8, S, lds, count, V, vs))
        if (M == 1) PV_SMALL(1);
        else if (M == 2) PV_SMALL(2);
        else PV_SMALL(3);
#undef PV_SMALL
        return;
    }
    int64_t i = 0;
    for (; i + ROW_BLOCK <= M; i += ROW_BLOCK) add_pv(st.acc, i, ROW_BLOCK, S, lds, count, V, vs, D);
    switch (M - i) { /* the rest, with a constant row count so its accumulators stay in registers */
    case 1: add_pv(st.acc, i, 1, S, lds, count, V, vs, D); break;
    case 2: add_pv(st.acc, i, 2, S, lds, count, V, vs, D); break;
    case 3: add_pv(st.acc, i, 3, S, lds, count, V, vs, D); break;
    case 4: add_pv(st.acc, i, 4, S, lds, count, V, vs, D); break;
    case 5: add_pv(st.acc, i, 5, S, lds, count, V, vs, D); break;
    case 6: add_pv(st.acc, i, 6, S, lds, count, V, vs, D); break;
    case 7: add_pv(st.acc, i, 7, S, lds, count, V, vs, D); break;
    default: break;
    }
}

#if defined(__AVX512BF16__)
#define HAVE_BF16_SCORES 1
/* block_scores' matrix form for bf16 queries over a bf16 cache, by vdpbf16ps (bf16 products, float
 * sums, as paged_attention.c's bf16 path): K's rows are packed as kt [D / 2, 16-key rows, 2] so that
 * one load holds a pair of dimensions of 16 keys, multiplied against a broadcast pair of each query's.
 * Half the instructions of the float form. K: the head's raw rows, `ks` apart. Fewer than PANEL_MIN_ROWS
 * queries need D % 32 == 0. */
static void block_scores_bf16(const uint16_t *Qb, int64_t M, const uint16_t *K, int64_t ks, int64_t count, int64_t D,
                              float scale, float *S, int64_t lds, uint16_t *kt) {
    const int64_t ldk = (count + LANES - 1) / LANES * LANES;
    if (M < PANEL_MIN_ROWS) { /* few queries (D % 32 == 0): 32-wide dot products, 16 keys summed at once */
        for (int64_t i = 0; i < M; i++)
            for (int64_t t0 = 0; t0 < count; t0 += LANES) {
                __m512 part[LANES];
                for (int t = 0; t < LANES; t++) {
                    __m512 a = _mm512_setzero_ps();
                    for (int64_t d = 0; d < D; d += 32)
                        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(Qb + i * D + d),
                                             (__m512bh)_mm512_loadu_si512(K + (t0 + t) * ks + d));
                    part[t] = a;
                }
                _mm512_storeu_ps(S + i * lds + t0, _mm512_mul_ps(hsum16(part), _mm512_set1_ps(scale)));
            }
        return;
    }
    for (int64_t t = 0; t < count; t++)
        for (int64_t d = 0; d < D; d += 2) {
            kt[(d / 2) * ldk * 2 + 2 * t] = K[t * ks + d];
            kt[(d / 2) * ldk * 2 + 2 * t + 1] = K[t * ks + d + 1];
        }
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t t0 = 0; t0 < count; t0 += LANES) {
        int64_t i = 0;
        for (; i + ROW_BLOCK <= M; i += ROW_BLOCK) {
            __m512 a[ROW_BLOCK];
            for (int r = 0; r < ROW_BLOCK; r++) a[r] = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 2) {
                const __m512bh k = (__m512bh)_mm512_loadu_si512(kt + (d / 2) * ldk * 2 + 2 * t0);
                for (int r = 0; r < ROW_BLOCK; r++) {
                    int32_t pair;
                    memcpy(&pair, Qb + (i + r) * D + d, sizeof pair);
                    a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32(pair), k);
                }
            }
            for (int r = 0; r < ROW_BLOCK; r++) _mm512_storeu_ps(S + (i + r) * lds + t0, _mm512_mul_ps(a[r], vscale));
        }
        for (; i < M; i++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 2) {
                int32_t pair;
                memcpy(&pair, Qb + i * D + d, sizeof pair);
                a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_set1_epi32(pair),
                                     (__m512bh)_mm512_loadu_si512(kt + (d / 2) * ldk * 2 + 2 * t0));
            }
            _mm512_storeu_ps(S + i * lds + t0, _mm512_mul_ps(a, vscale));
        }
    }
}
#endif
#endif
