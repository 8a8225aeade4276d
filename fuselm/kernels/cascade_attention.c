/* Shared-prefix ("cascade") decode attention for CPU: query rows whose block tables start with the
 * same blocks read those blocks once per step for all of them, instead of once per row.
 *
 * Many sequences of a step often share a long prefix (a system prompt, few-shot examples, the n
 * samples of one prompt): the prefix cache stores its K/V once, but a per-row kernel
 * (paged_attention.c) reads it once per row. Here attention of such a group runs in two parts
 * (Hydragen, RelayAttention):
 *   1. every query of the group against the shared blocks, one KV head at a time: all of the
 *      group's rows x the head's GQA query heads form one matrix, each shared block is loaded once
 *      and multiplied against it (a small matrix-matrix product per block), keeping an online
 *      softmax state (running max m, sum l, unnormalised output acc) per query;
 *   2. each row against its own blocks past the shared ones, continuing from that state.
 * Continuing an online softmax from another's state is the exact log-sum-exp merge of the two
 * partial attentions (scale by exp(m_old - m_new), add), so results equal one pass over the whole
 * context up to float rounding. Shared blocks are split into chunks across threads; the chunks'
 * states are merged the same way.
 *
 * Layouts as paged_attention.c (q, out [num_seqs, num_heads, head_dim]; caches [blocks, block_size,
 * num_kv_heads, head_dim]; block_table [num_seqs, max_blocks]; the first num_write rows' new K/V
 * stored first). `shared` describes the groups (fuselm_kernels.h). A group's shared blocks must
 * hold no slot written in this step. Needs head_dim % 16 == 0 and block_size % 16 == 0.
 * The vector type below is GCC's generic vector extension, lowered to the widest registers the
 * build's ISA variant has (one zmm with AVX-512, two ymm with AVX2).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_simd.h"
#include "fuselm_kernels.h"

typedef float v16f __attribute__((vector_size(64)));
/* Only static functions pass v16f by value, so the psABI note GCC gives for 64-byte vectors in
 * builds without AVX-512 concerns no interface. */
#pragma GCC diagnostic ignored "-Wpsabi"
/* ISO C mode (-std=c11) turns off contracting a * b + c into one FMA; the vector loops need it. */
#pragma GCC optimize("fp-contract=fast")

#define LANES 16
#define ROW_BLOCK 8       /* queries multiplied together against one loaded tile of K or V */
#define PANEL_MIN_ROWS 8  /* from this many queries on, K is transposed per block (see block_scores) */
#define CHUNK_MIN_BLOCKS 4

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

/* exp(x) for x <= 0 (after max subtraction): 2^(x log2 e) = 2^n 2^f, f in [-0.5, 0.5], 2^f by its
 * degree-6 Taylor polynomial (relative error ~2e-7). Plain arithmetic, so loops over it vectorise. */
static inline float exp_le0(float x) {
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
    const float a = exp_le0(dst.m[di] - m), b = exp_le0(src.m[si] - m);
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
        const float correction = exp_le0(st.m[i] - new_max);
#pragma omp simd
        for (int64_t t = 0; t < count; t++) s[t] = exp_le0(s[t] - new_max);
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

/* Per-thread scratch for one span of blocks. qb: the queries as unscaled bf16 [M, D] when the scores
 * take the bf16 path (block_scores_bf16), else NULL. */
typedef struct {
    float *scores, *kt, *k_rows, *v_rows;
    uint16_t *qb;
    float scale;
} Scratch;

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

/* Ask for head h's K and V rows of the block starting at cache row first_row (the hardware prefetcher
 * cannot guess where the next block of a table lies). */
static inline void prefetch_head_rows(const void *k_cache, const void *v_cache, int kv_dtype, int64_t first_row,
                                      int64_t h, int64_t row_elems, int64_t bs, int64_t D) {
    const int64_t width = kv_dtype == FUSELM_F32 ? 4 : 2;
    for (int64_t t = 0; t < bs; t++) {
        const int64_t at = ((first_row + t) * row_elems + h * D) * width;
        for (int64_t off = 0; off < D * width; off += 64) {
            __builtin_prefetch((const char *)k_cache + at + off);
            __builtin_prefetch((const char *)v_cache + at + off);
        }
    }
}

/* Attend M queries of KV head h (Q [M, D], pre-scaled; w.qb, when set, the same unscaled in bf16) to context positions [first_block * bs, len) of
 * one block table, continuing the state st. */
static void attend_span(const float *Q, int64_t M, State st, const void *k_cache, const void *v_cache, int kv_dtype,
                        const int64_t *table, int64_t first_block, int64_t len, int64_t h, int64_t row_elems,
                        int64_t D, int64_t bs, Scratch w) {
    for (int64_t b = first_block, start = first_block * bs; start < len; b++, start += bs) {
        const int64_t count = len - start < bs ? len - start : bs;
        const int64_t first_row = table[b] * bs;
        if (start + bs < len) /* blocks sit anywhere in the pool: fetch the next one's rows of this head now */
            prefetch_head_rows(k_cache, v_cache, kv_dtype, table[b + 1] * bs, h, row_elems, bs, D);
        int64_t ks, vs;
#ifdef HAVE_BF16_SCORES
        if (w.qb != NULL)
            block_scores_bf16(w.qb, M, (const uint16_t *)k_cache + first_row * row_elems + h * D, row_elems, count, D,
                              w.scale, w.scores, bs, (uint16_t *)w.kt);
        else
#endif
        {
            const float *K = head_rows(k_cache, kv_dtype, first_row, h, row_elems, count, D, w.k_rows, &ks);
            block_scores(Q, M, K, ks, count, D, w.scores, bs, w.kt);
        }
        const float *V = head_rows(v_cache, kv_dtype, first_row, h, row_elems, count, D, w.v_rows, &vs);
        block_update(st, M, w.scores, bs, count, V, vs, D);
    }
}

/* Scaled float queries [G, D] of KV head h of row n (its query heads h*G .. h*G + G - 1). */
static void gather_queries(const void *q, int dtype, int64_t n, int64_t h, int64_t G, int64_t num_heads, int64_t D,
                           float scale, float *dst) {
    const int64_t base = (n * num_heads + h * G) * D;
    for (int64_t i = 0; i < G * D; i++)
        dst[i] = scale * (dtype == FUSELM_F32 ? ((const float *)q)[base + i] : bf16_to_f32(((const uint16_t *)q)[base + i]));
}

static inline void store_new_row(void *cache, int64_t slot, const void *src, int64_t index, int64_t elems, int dtype,
                                 int kv_dtype) {
    if (kv_dtype == FUSELM_F32) {
        float *d = (float *)cache + slot * elems;
        for (int64_t i = 0; i < elems; i++)
            d[i] = dtype == FUSELM_F32 ? ((const float *)src)[index * elems + i]
                                       : bf16_to_f32(((const uint16_t *)src)[index * elems + i]);
    } else {
        uint16_t *d = (uint16_t *)cache + slot * elems;
        for (int64_t i = 0; i < elems; i++)
            d[i] = dtype == FUSELM_BF16 ? ((const uint16_t *)src)[index * elems + i]
                                        : f32_to_bf16(((const float *)src)[index * elems + i]);
    }
}

int fuselm_cascade_supported(int64_t head_dim, int64_t block_size) {
    return head_dim % LANES == 0 && block_size % LANES == 0 && head_dim <= 1024;
}

void fuselm_cascade_attention(const void *q, void *out, void *k_cache, void *v_cache, const void *k_new,
                              const void *v_new, int64_t num_write, const int64_t *block_table, const int64_t *ctx_lens,
                              int64_t num_seqs, int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim, int64_t block_size, float scale, int dtype, int kv_dtype,
                              int num_threads, const int64_t *shared) {
    const int64_t D = head_dim, bs = block_size, Hkv = num_kv_heads, G = num_heads / num_kv_heads;
    const int64_t row_elems = Hkv * D;
    const int64_t num_groups = shared[0];
    const int64_t *offsets = shared + 1, *shared_blocks = shared + 2 + num_groups, *rows = shared + 2 + 2 * num_groups;
    /* which group each row belongs to (-1: none) and its index in it */
    int64_t *row_group = malloc(sizeof(int64_t) * (size_t)(2 * num_seqs));
    int64_t *row_index = row_group + num_seqs;
    for (int64_t n = 0; n < num_seqs; n++) row_group[n] = -1;
    /* prefix work items: (group, KV head, chunk of shared blocks), each with its own partial state */
    int64_t *item_first = malloc(sizeof(int64_t) * (size_t)(num_groups + 1));
    int64_t *chunks = malloc(sizeof(int64_t) * (size_t)(num_groups + 1));
    int64_t *state_at = malloc(sizeof(int64_t) * (size_t)(num_groups + 1)); /* float offset of group's states */
    int64_t num_items = 0, state_floats = 0, max_m = 1;
    const int64_t target_items = 4 * (int64_t)num_threads;
    for (int64_t g = 0; g < num_groups; g++) {
        const int64_t R = offsets[g + 1] - offsets[g];
        for (int64_t r = 0; r < R; r++) {
            row_group[rows[offsets[g] + r]] = g;
            row_index[rows[offsets[g] + r]] = r;
        }
        int64_t c = (target_items + num_groups * Hkv - 1) / (num_groups * Hkv);
        const int64_t most = shared_blocks[g] / CHUNK_MIN_BLOCKS;
        c = c > most ? most : c;
        chunks[g] = c < 1 ? 1 : c;
        item_first[g] = num_items;
        state_at[g] = state_floats;
        num_items += Hkv * chunks[g];
        state_floats += Hkv * chunks[g] * R * G * (D + 2);
        max_m = R * G > max_m ? R * G : max_m;
    }
    item_first[num_groups] = num_items;
    float *states = malloc(sizeof(float) * (size_t)(state_floats > 0 ? state_floats : 1));

#pragma omp parallel num_threads(num_threads)
    {
        const int64_t mq = max_m > G ? max_m : G;
        float *Q = malloc(sizeof(float) * (size_t)(mq * D));
        Scratch w = {malloc(sizeof(float) * (size_t)(mq * bs)), malloc(sizeof(float) * (size_t)(D * bs)),
                     malloc(sizeof(float) * (size_t)(bs * D)), malloc(sizeof(float) * (size_t)(bs * D)), NULL, scale};
        uint16_t *qb = NULL;
#ifdef HAVE_BF16_SCORES
        if (dtype == FUSELM_BF16 && kv_dtype == FUSELM_BF16) qb = malloc(sizeof(uint16_t) * (size_t)(mq * D));
#endif
        float *own = malloc(sizeof(float) * (size_t)(G * (D + 2)));

        if (k_new != NULL) { /* this step's single-token rows: their K/V go in before anything is read */
#pragma omp for schedule(static)
            for (int64_t n = 0; n < num_write; n++) {
                const int64_t pos = ctx_lens[n] - 1;
                const int64_t slot = block_table[n * max_blocks + pos / bs] * bs + pos % bs;
                store_new_row(k_cache, slot, k_new, n, row_elems, dtype, kv_dtype);
                store_new_row(v_cache, slot, v_new, n, row_elems, dtype, kv_dtype);
            }
        }

        /* 1. shared blocks: every query of a group and KV head against a chunk of them */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < num_items; it++) {
            int64_t g = 0;
            while (item_first[g + 1] <= it) g++;
            const int64_t local = it - item_first[g], h = local / chunks[g], c = local % chunks[g];
            const int64_t R = offsets[g + 1] - offsets[g], M = R * G;
            for (int64_t r = 0; r < R; r++) {
                gather_queries(q, dtype, rows[offsets[g] + r], h, G, num_heads, D, scale, Q + r * G * D);
                if (qb != NULL)
                    memcpy(qb + r * G * D, (const uint16_t *)q + (rows[offsets[g] + r] * num_heads + h * G) * D,
                           sizeof(uint16_t) * (size_t)(G * D));
            }
            w.qb = qb != NULL && (M >= PANEL_MIN_ROWS || D % 32 == 0) ? qb : NULL;
            float *base = states + state_at[g] + local * M * (D + 2);
            State st = {base, base + M, base + 2 * M};
            reset_state(st, M, D);
            const int64_t b0 = shared_blocks[g] * c / chunks[g], b1 = shared_blocks[g] * (c + 1) / chunks[g];
            attend_span(Q, M, st, k_cache, v_cache, kv_dtype, block_table + rows[offsets[g]] * max_blocks, b0, b1 * bs,
                        h, row_elems, D, bs, w);
        }

        /* 2. each row's own blocks, continuing from its group's merged state; then normalise */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < num_seqs * Hkv; it++) {
            const int64_t n = it / Hkv, h = it % Hkv, g = row_group[n];
            State st = {own, own + G, own + 2 * G};
            reset_state(st, G, D);
            int64_t first_block = 0;
            if (g >= 0) {
                const int64_t R = offsets[g + 1] - offsets[g], M = R * G;
                for (int64_t c = 0; c < chunks[g]; c++) {
                    float *base = states + state_at[g] + (h * chunks[g] + c) * M * (D + 2);
                    const State part = {base, base + M, base + 2 * M};
                    for (int64_t j = 0; j < G; j++) merge_state(st, j, part, row_index[n] * G + j, D);
                }
                first_block = shared_blocks[g];
            }
            gather_queries(q, dtype, n, h, G, num_heads, D, scale, Q);
            w.qb = NULL;
            if (qb != NULL && D % 32 == 0) {
                memcpy(qb, (const uint16_t *)q + (n * num_heads + h * G) * D, sizeof(uint16_t) * (size_t)(G * D));
                w.qb = qb;
            }
            attend_span(Q, G, st, k_cache, v_cache, kv_dtype, block_table + n * max_blocks, first_block, ctx_lens[n], h,
                        row_elems, D, bs, w);
            for (int64_t j = 0; j < G; j++) {
                const float inv = 1.0f / st.l[j];
                const int64_t o = (n * num_heads + h * G + j) * D;
                for (int64_t d = 0; d < D; d++) {
                    const float x = st.acc[j * D + d] * inv;
                    if (dtype == FUSELM_F32)
                        ((float *)out)[o + d] = x;
                    else
                        ((uint16_t *)out)[o + d] = f32_to_bf16(x);
                }
            }
        }
        free(Q), free(qb), free(w.scores), free(w.kt), free(w.k_rows), free(w.v_rows), free(own);
    }
    free(states), free(state_at), free(chunks), free(item_first), free(row_group);
}
