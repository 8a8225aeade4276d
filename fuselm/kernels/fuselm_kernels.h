/* The interface of fuselm's CPU kernel library, written once: every function the library exports,
 * the structures fuselm/kernels/c_layers.py hands to decode_layers.c, and the element type codes.
 * Every kernel source includes it, and no source declares another's functions.
 *
 * Python mirrors this file in fuselm/kernels/abi.py (ctypes signatures, structures, codes). The
 * library reports what it was built from (abi.c: the ABI version, and the size and offset of every
 * mirrored field and the value of every code), and fuselm/kernels/cpu.py refuses a library that
 * disagrees with the mirror. Raise FUSELM_ABI_VERSION with any change to a signature, structure or
 * code below, and update abi.py with it.
 */
#ifndef FUSELM_KERNELS_H
#define FUSELM_KERNELS_H
#include <math.h>
#include <stdint.h>

#define FUSELM_ABI_VERSION 13

/* Element types, passed as int wherever a parameter is named dtype, kv_dtype or scale_dtype. */
enum FuselmDtype { FUSELM_F32 = 0, FUSELM_BF16 = 1, FUSELM_F16 = 2, FUSELM_I8 = 3 }; /* I8: an int8 KV cache */

/* ---- the build itself (abi.c) ---- */

typedef struct {
    const char *name; /* "sizeof(QPart)", "offsetof(QPart, bits)", "sizeof(QPart.bits)", "FUSELM_BF16", ... */
    int64_t value;
} FuselmAbiEntry;

int fuselm_abi_version(void);
const char *fuselm_build_key(void); /* the cache key fuselm/kernels/build.py compiled this library under */
const char *fuselm_isa(void);       /* its ISA variant: "generic", "avx2", "avx512", "avx512bf16" */
const FuselmAbiEntry *fuselm_abi_table(int64_t *count);

/* ---- paged decode attention (paged_attention.c) ---- */

int fuselm_max_group(void); /* most query heads per KV head */
int fuselm_max_dim(void);   /* largest head_dim */
int fuselm_max_block(void); /* largest block_size */
int fuselm_has_bf16_fast_path(void);
int fuselm_has_f32_avx512_attention(void);
/* q, out [num_seqs, num_heads, head_dim] (dtype); caches [blocks, block_size, num_kv_heads, head_dim]
 * (kv_dtype); block_table [num_seqs, max_blocks]; k_new/v_new [num_write, num_kv_heads, head_dim] or NULL. */
void fuselm_paged_decode_attention(const void *q, void *out, void *k_cache, void *v_cache, const void *k_new,
                                   const void *v_new, int64_t num_write, const int64_t *block_table,
                                   const int64_t *ctx_lens, int64_t num_seqs, int64_t max_blocks, int64_t num_heads,
                                   int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int dtype,
                                   int kv_dtype, int num_threads);
/* fuselm_paged_decode_attention where row n attends to positions ctx_starts[n] .. ctx_lens[n] - 1
 * (a sliding window); ctx_starts [num_seqs] int64, or NULL for the whole context. */
void fuselm_paged_window_attention(const void *q, void *out, void *k_cache, void *v_cache, const void *k_new,
                                   const void *v_new, int64_t num_write, const int64_t *block_table,
                                   const int64_t *ctx_lens, const int64_t *ctx_starts, int64_t num_seqs,
                                   int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                   int64_t block_size, float scale, int dtype, int kv_dtype, int num_threads);
void fuselm_store_kv_rows(void *k_cache, void *v_cache, const void *k_new, const void *v_new, int64_t first,
                          int64_t last, const int64_t *block_table, const int64_t *ctx_lens, int64_t max_blocks,
                          int64_t row_elems, int64_t block_size, int dtype, int kv_dtype);

/* ---- paged decode attention over an int8 KV cache (paged_attention_int8.c) ---- */

/* As above, with caches [blocks, block_size, num_kv_heads, head_dim] int8 and their per-token, per-head
 * scales k_scale/v_scale [blocks, block_size, num_kv_heads] bfloat16 (fuselm/layers/kv_quant.py). */
void fuselm_paged_decode_attention_int8(const void *q, void *out, int8_t *k_cache, int8_t *v_cache, uint16_t *k_scale,
                                        uint16_t *v_scale, const void *k_new, const void *v_new, int64_t num_write,
                                        const int64_t *block_table, const int64_t *ctx_lens, int64_t num_seqs,
                                        int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                        int64_t block_size, float scale, int dtype, int num_threads);
void fuselm_store_kv_rows_int8(int8_t *k_cache, int8_t *v_cache, uint16_t *k_scale, uint16_t *v_scale,
                               const void *k_new, const void *v_new, int64_t first, int64_t last,
                               const int64_t *block_table, const int64_t *ctx_lens, int64_t max_blocks,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int dtype);

/* ---- shared-prefix (cascade) decode attention (cascade_attention.c) ---- */

/* Groups of query rows whose block tables start with the same blocks, as one int64 array:
 * [num_groups, offsets[0 .. num_groups], shared_blocks[0 .. num_groups - 1], rows...]; group g is
 * rows[offsets[g] .. offsets[g + 1]), sharing its first shared_blocks[g] block-table entries. */
int fuselm_cascade_supported(int64_t head_dim, int64_t block_size);
/* fuselm_paged_decode_attention's arguments, plus the groups: each group's queries read its shared
 * blocks once, together; rows outside every group attend as in fuselm_paged_decode_attention. */
void fuselm_cascade_attention(const void *q, void *out, void *k_cache, void *v_cache, const void *k_new,
                              const void *v_new, int64_t num_write, const int64_t *block_table, const int64_t *ctx_lens,
                              int64_t num_seqs, int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim, int64_t block_size, float scale, int dtype, int kv_dtype,
                              int num_threads, const int64_t *shared);
/* The same over an int8 cache and its scales (as fuselm_paged_decode_attention_int8 takes them); new rows
 * are quantised as fuselm_store_kv_rows_int8 stores them. */
void fuselm_cascade_attention_int8(const void *q, void *out, int8_t *k_cache, int8_t *v_cache, uint16_t *k_scale,
                                   uint16_t *v_scale, const void *k_new, const void *v_new, int64_t num_write,
                                   const int64_t *block_table, const int64_t *ctx_lens, int64_t num_seqs,
                                   int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                   int64_t block_size, float scale, int dtype, int num_threads, const int64_t *shared);

/* ---- a prompt chunk's causal attention (chunk_attention.c) ---- */

int fuselm_chunk_attention_supported(int64_t head_dim);
/* q, out [n, num_heads, head_dim] float32 or bfloat16 (dtype): the chunk's n tokens at positions num_cached ..
 * num_cached + n - 1, each attending to positions 0 .. its own through slots [num_cached + n] (the cache slot of
 * every position; the chunk's own K/V already stored). Caches as fuselm_paged_decode_attention's, or int8 (kv_dtype
 * FUSELM_I8) with bf16 scales k_scale / v_scale [blocks, block_size, num_kv_heads], else NULL. bfloat16 queries
 * over a bfloat16 cache take the bf16 panels where the build has AVX-512-BF16; otherwise the arithmetic is float32. */
void fuselm_chunk_attention(const void *q, void *out, const void *k_cache, const void *v_cache, const uint16_t *k_scale,
                            const uint16_t *v_scale, const int64_t *slots, int64_t num_cached, int64_t n,
                            int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int dtype,
                            int kv_dtype, int num_threads);

/* ---- per-layer ops (layer_ops.c) ---- */

int fuselm_small_m_max(void);
int fuselm_has_small_m_linear(void);
void fuselm_linear_bf16_small_m(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                                int64_t N, int64_t K, int num_threads);
void fuselm_rms_norm(const void *x, const void *weight, void *out, int64_t M, int64_t D, float eps, int dtype,
                     int num_threads);

/* ---- quantised linear layers (quant_linear.c); scale_dtype FUSELM_F32 or FUSELM_F16 ---- */

int fuselm_qlinear_has_simd(void);
void fuselm_qlinear_ld(const float *x, const void *qweight, const void *scales, const void *mins, const float *bias,
                       float *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t G, int bits, int scale_dtype,
                       int float_activations, int num_threads);
void fuselm_qlinear(const float *x, const void *qweight, const void *scales, const void *mins, const float *bias,
                    float *y, int64_t M, int64_t N, int64_t K, int64_t G, int bits, int scale_dtype,
                    int float_activations, int num_threads);
void fuselm_dequantize(const void *qweight, const void *scales, const void *mins, float *out, int64_t N, int64_t K,
                       int64_t G, int bits, int scale_dtype, int num_threads);

/* ---- quantised weight rows against activations rounded once per call (quant_rows.c) ---- */

/* x [M, K] rounded to int16 levels per 32 values (xs: one scale per 32) and, for int4, x's float sums per
 * group of G (xg). The levels are int16 (xq) or, for int4 and the tiles with VNNI, split in high and low int8
 * halves (xh, xl), in the lane order quant_rows.c's int4 blocks read, with each block's level sum (xv) for int8 tiles.
 * layout 0: not prepared. */
enum { FUSELM_QACTS_NONE = 0, FUSELM_QACTS_INT16 = 1, FUSELM_QACTS_SPLIT8 = 2 };
typedef struct {
    int16_t *xq;
    int8_t *xh, *xl;
    float *xs, *xg;
    int32_t *xv;
    int64_t M, K, G;
    int32_t bits, layout;
} QActs;

/* 1 when ready for weights of `bits` and group G; 0 (nothing held) when this build or shape cannot. */
int fuselm_qacts_prepare(QActs *a, const float *x, int64_t ldx, int64_t M, int64_t K, int64_t G, int bits,
                         int num_threads);
void fuselm_qacts_release(QActs *a);
/* fuselm_qacts_prepare for int4 or int8 (bits) g32 tiles (int4_rows16.c, int8_rows16.c): the split layout at any
 * K % 32 == 0; 0 where the build has no tiles of that width (fuselm_int4_rows16_available, _int8_). */
int fuselm_qacts_prepare_tiles(QActs *a, const float *x, int64_t ldx, int64_t M, int64_t K, int bits,
                               int num_threads);
/* 1 where fuselm_qrows reads `bits`-wide rows of K from the split layout (int4 at K % 128 with VNNI), 0 where from
 * the int16 one: whether rows may share a tiled weight's activations. */
int fuselm_qrows_read_split(int bits, int64_t K);
/* y[m * ldy + n] for rows m in [m0, m0 + rows), weight rows n in [n0, n1); qweight/scales/mins at row 0. */
void fuselm_qrows(const QActs *a, int64_t m0, int64_t rows, const void *qweight, const void *scales, const void *mins,
                  int scale_dtype, int64_t n0, int64_t n1, float *y, int64_t ldy);

/* ---- int4 g32 weights sixteen rows to a tile (int4_rows16.c; fuselm/quant/int4_rows16.py packs them) ---- */

/* 1 when this build has the kernel (AVX512_VNNI, or AVX2 without AVX-512); elsewhere nothing may be repacked. */
int fuselm_int4_rows16_available(void);
/* The same for int8 tiles (int8_rows16.c: AVX512_VNNI builds only). */
int fuselm_int8_rows16_available(void);
/* Bytes of an [N, K] weight's tiles (N a multiple of 16, K of 32). */
int64_t fuselm_int4_rows16_bytes(int64_t N, int64_t K, int scale_dtype);
/* y[m * ldy + n] for activation rows [m0, m0 + rows) of `a` (layout FUSELM_QACTS_SPLIT8, G 32) and weight rows
 * [n0, n1) (multiples of 16) of the tiles. */
void fuselm_int4_rows16(const QActs *a, int64_t m0, int64_t rows, const void *tiles, int scale_dtype, int64_t n0,
                        int64_t n1, float *y, int64_t ldy);
/* The tiles' weight as float32 [N, K] (q * scale + min), as fuselm_dequantize. */
void fuselm_int4_rows16_dequantize(const void *tiles, int scale_dtype, float *out, int64_t N, int64_t K,
                                   int num_threads);

/* ---- int8 g32 weights sixteen rows to a tile (int8_rows16.c; fuselm/quant/int8_rows16.py packs them) ---- */

/* Available where fuselm_int4_rows16_available says. Bytes of an [N, K] weight's tiles (N a multiple of 16, K of 32). */
int64_t fuselm_int8_rows16_bytes(int64_t N, int64_t K, int scale_dtype);
/* As fuselm_int4_rows16, for int8 tiles (activations from fuselm_qacts_prepare_tiles with bits 8). */
void fuselm_int8_rows16(const QActs *a, int64_t m0, int64_t rows, const void *tiles, int scale_dtype, int64_t n0,
                        int64_t n1, float *y, int64_t ldy);
/* The tiles' weight as float32 [N, K] (q * scale). */
void fuselm_int8_rows16_dequantize(const void *tiles, int scale_dtype, float *out, int64_t N, int64_t K,
                                   int num_threads);

/* ---- the tiles by width (rows16.c): bits 4 -> int4_rows16.c, 8 -> int8_rows16.c ---- */

/* fuselm_int4_rows16 or fuselm_int8_rows16. */
void fuselm_rows16(const QActs *a, int64_t m0, int64_t rows, const void *tiles, int bits, int scale_dtype, int64_t n0,
                   int64_t n1, float *y, int64_t ldy);
/* A dense layer in tiles: y [M, N] (row stride ldy) = x [M, K] @ W^T (+ bias), x rounded once, the rows split
 * between threads. fuselm_qlinear_ld takes this path for a weight given with scales NULL. */
void fuselm_rows16_linear(const float *x, const void *tiles, int bits, int scale_dtype, const float *bias, float *y,
                          int64_t ldy, int64_t M, int64_t N, int64_t K, int num_threads);

/* ---- float32 GEMM over a panel-packed weight (dense_linear.c) ---- */

int fuselm_dense_has_simd(void);
/* The most rows of x a GEMM register tile takes (1 .. fuselm_dense_max_tile_rows(); process-wide): tile shapes
 * never change results, only speed. */
void fuselm_dense_set_tile_rows(int rows);
int fuselm_dense_max_tile_rows(void);
int64_t fuselm_dense_packed_size(int64_t N, int64_t K);
void fuselm_dense_pack(const float *w, float *packed, int64_t N, int64_t K, int num_threads);
void fuselm_dense_linear(const float *x, int64_t ldx, const float *packed, const float *bias, float *y, int64_t ldy,
                         int64_t M, int64_t N, int64_t K, int num_threads);

/* ---- whole decoder layers (decode_layers.c) ---- */

#define FUSELM_MAX_PARTS 3

/* One weight: a QuantWeight (bits 4 or 8), or a float32 weight in dense_linear.c's panel layout (bits 32,
 * qweight = the packed floats, no scales). A projection is up to FUSELM_MAX_PARTS of them side by side. */
typedef struct {
    const void *qweight, *scales, *mins;
    int64_t n, k, group;
    int32_t bits, scale_dtype;
} QPart;

typedef struct {
    QPart parts[FUSELM_MAX_PARTS];
    int64_t num_parts;
    const float *bias; /* [sum of n] or NULL */
} QProj;

/* A mixture-of-experts feed-forward (moe.c fuselm_moe_block): the router, then every expert end to end
 * as fuselm_moe_experts takes them. routed_ids [M, top_k] receives each call's chosen experts. A shared
 * expert (Qwen2-MoE; NULL pointers: none) adds sigmoid(shared_gate(h)) * shared_down(silu(g) * u), [g | u] =
 * shared_gate_up(h), to every row. */
typedef struct {
    QProj router; /* [num_experts, hidden] */
    QPart gate, up, down;
    int64_t num_experts, top_k;
    int32_t renormalize, float_activations;
    int64_t *routed_ids;
    const QProj *shared_gate_up; /* [2 * shared_intermediate, hidden] */
    const QProj *shared_down;    /* [hidden, shared_intermediate] */
    const QProj *shared_gate;    /* [1, hidden] */
    int64_t shared_intermediate;
} QMoe;

typedef struct {
    QProj qkv, o, gate_up, down;
    const float *input_norm, *post_norm; /* [hidden] */
    void *k_cache, *v_cache;
    void *k_scale, *v_scale; /* an int8 cache's bf16 scales [blocks, block_size, num_kv_heads]; else NULL */
    const QMoe *moe; /* NULL: the dense gated MLP (gate_up, down); else this MoE block instead */
    const float *q_norm, *k_norm; /* RMSNorm of q and k before rotary; NULL: none. [head_dim], each head (Qwen3); */
    int32_t qk_norm_whole;        /* 1: [Hq * head_dim] / [Hkv * head_dim], over the whole q / k (OLMoE) */
    float clip_qkv;               /* > 0: q, k (after their norms) and v clamped to +-clip_qkv (OLMoE); 0: none */
} QLayer;

typedef struct {
    int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size, max_blocks;
    float eps, scale;
    int32_t kv_dtype, num_threads;
} QModelDims;

void fuselm_layer_attention_inputs(const QLayer *layers, int64_t l, const QModelDims *dims, const float *x, int64_t M,
                                   const float *cos, const float *sin, float *q, float *k, float *v);
void fuselm_layer_attention_outputs(const QLayer *layers, int64_t l, const QModelDims *dims, float *x,
                                    const float *attn, int64_t M);
/* y [M, sum of parts' n] = x [M, k] @ p^T (+ bias), the parts side by side. */
void fuselm_project(const QProj *p, const float *x, float *y, int64_t M, int num_threads);
/* act [M, I] = silu(gu[:, :I]) * gu[:, I:] for gu [M, 2I] (the gated MLP's middle). */
void fuselm_silu_mul(const float *gu, float *act, int64_t M, int64_t I, int num_threads);
/* quant_project.c: every part of p quantised alike, in one pass over activations rounded once; 0 (nothing
 * written) where it does not apply (float parts, mixed formats, a build without quant_rows.c's kernels). */
int fuselm_qproject(const QProj *p, const float *x, float *y, int64_t M, int num_threads);
/* shared: the step's shared-prefix groups (the cascade encoding above), or NULL for none */
void fuselm_decode_layers(const QLayer *layers, int64_t num_layers, const QModelDims *dims, float *x, int64_t M,
                          int64_t num_single, const float *cos, const float *sin, const int64_t *block_table,
                          const int64_t *ctx_lens, const int64_t *shared);

/* ---- mixture-of-experts feed-forward, every routed expert of a step in one call (moe.c) ---- */

/* act rows [r0, r0 + rows), columns [c0, c1) = silu(gate) * up of the same rows of gu [., 2I] (gate | up): the
 * expression every MoE path shares, so that a token's result does not depend on which path ran it. */
static inline void fuselm_moe_silu_mul(const float *gu, float *act, int64_t I, int64_t r0, int64_t rows, int64_t c0,
                                       int64_t c1) {
    for (int64_t p = r0; p < r0 + rows; p++)
        for (int64_t i = c0; i < c1; i++) {
            const float g = gu[p * 2 * I + i];
            act[p * I + i] = g / (1.0f + expf(-g)) * gu[p * 2 * I + I + i];
        }
}

/* Rows [r0, r0 + rows) of yd [., H], columns [h0, h1), times their assignment's routing weight: the down
 * projection's epilogue (row p is assignment src[p]). */
static inline void fuselm_moe_weigh(float *yd, int64_t H, int64_t r0, int64_t rows, int64_t h0, int64_t h1,
                                    const float *topk_weights, const int64_t *src) {
    for (int64_t p = r0; p < r0 + rows; p++) {
        const float w = topk_weights[src[p]];
        for (int64_t h = h0; h < h1; h++) yd[p * H + h] *= w;
    }
}

/* Token t's output columns [h0, h1): the sum of its top_k expert rows of yd (row pos[t * top_k + s] for
 * slot s), added in slot order, which fixes the rounding every MoE path shares. */
static inline void fuselm_moe_combine(float *out, const float *yd, const int64_t *pos, int64_t t, int64_t top_k,
                                      int64_t H, int64_t h0, int64_t h1) {
    float *o = out + t * H;
    const float *first = yd + pos[t * top_k] * H;
    for (int64_t h = h0; h < h1; h++) o[h] = first[h];
    for (int64_t s = 1; s < top_k; s++) {
        const float *y = yd + pos[t * top_k + s] * H;
        for (int64_t h = h0; h < h1; h++) o[h] += y[h];
    }
}

/* out [T, hidden] = sum over each token's top_k (expert, weight) pairs of weight * down(silu(gate(x)) * up(x)).
 * gate/up/down: every expert's weight end to end, one QPart each (n, k per expert; bits 4/8 quantised rows,
 * bits 32 dense_linear.c panels of fuselm_dense_packed_size(n, k) floats per expert). */
void fuselm_moe_experts(const float *x, int64_t T, int64_t top_k, const int64_t *topk_ids, const float *topk_weights,
                        int64_t num_experts, const QPart *gate, const QPart *up, const QPart *down, float *out,
                        int float_activations, int num_threads);
/* At least `floats` floats of the calling thread's scratch for a step's grouped expert rows (moe.c, moe_float.c),
 * kept between calls; valid until the thread's next call. NULL if it cannot grow. */
float *fuselm_moe_scratch(int64_t floats);
/* A step's grouped rows in the calling thread's fuselm_moe_scratch, for A (token, slot) assignments: xs [A, H] the
 * tokens by expert, gu [A, 2I] gate | up, act [A, I] silu(gate) * up, yd [A, H] the weighted expert outputs. */
typedef struct {
    float *xs, *gu, *act, *yd;
} MoeRows;
static inline MoeRows fuselm_moe_rows(int64_t A, int64_t H, int64_t I) {
    MoeRows r;
    r.xs = fuselm_moe_scratch(A * (2 * H + 3 * I));
    r.gu = r.xs + A * H;
    r.act = r.gu + A * 2 * I;
    r.yd = r.act + A * I;
    return r;
}
/* fuselm_moe_experts for float32 experts (every QPart bits 32) in one parallel region (moe_float.c), given the
 * step's grouping: offsets [E + 1] (expert e's sorted rows), pos [A] (assignment -> sorted row), src [A] (its inverse). */
void fuselm_moe_float_experts(const float *x, int64_t T, int64_t top_k, const float *topk_weights, int64_t num_experts,
                              const int64_t *offsets, const int64_t *pos, const int64_t *src, const QPart *gate,
                              const QPart *up, const QPart *down, float *out, int num_threads);
/* fuselm_qacts_prepare or, for a part in tiles (scales NULL), fuselm_qacts_prepare_tiles: x [M, w->k] rounded for w. */
int fuselm_qacts_prepare_part(QActs *a, const QPart *w, const float *x, int64_t ldx, int64_t M, int num_threads);
/* 1 when activations prepared for one part can be read by part w (same bits, group, K and layout). */
int fuselm_qacts_fit(const QActs *a, const QPart *w);
/* Expert e of a stacked QPart in tiles (bits 4 or 8, scales NULL: every expert's tiles end to end), as
 * fuselm_rows16 (rows16.c). */
void fuselm_rows16_expert(const QPart *w, int64_t e, const QActs *a, int64_t m0, int64_t rows, int64_t n0, int64_t n1,
                          float *y, int64_t ldy);
/* moe_few_rows.c: fuselm_moe_experts for a decode step's few (token, slot) assignments of quantised experts in one
 * parallel region, the same bits; 0 (nothing written) where it does not apply. */
int fuselm_moe_experts_few(const float *x, int64_t T, int64_t top_k, const int64_t *topk_ids, const float *topk_weights,
                           int64_t num_experts, const QPart *gate, const QPart *up, const QPart *down, float *out,
                           int float_activations, int num_threads);
/* out [M, hidden] = the MoE block of h [M, hidden]: router logits, softmax, top_k (renormalised when
 * moe->renormalize), then fuselm_moe_experts. */
void fuselm_moe_block(const QMoe *moe, const float *h, float *out, int64_t M, int num_threads);

#endif
