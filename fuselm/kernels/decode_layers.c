/* Every decoder layer of a decode step in one C call, for float32 models whose projections are quantised
 * (quant_linear.c) or fuselm-packed float32 (dense_linear.c).
 *
 * At batch 1 a quantised SmolLM2-135M spends its step in Python, not in arithmetic: the eager
 * layer is ~25 torch ops and kernel calls (norms, rotary, splits, SiLU, residual adds), about
 * 370 us a layer on a 2-core EPYC against ~70 us of weight streaming (measured: 27 ms steps of
 * which the quantised matmuls were 12.7 ms). This runs the same layer here: RMSNorm,
 * fused q/k/v (+ bias), rotary, paged attention (fuselm_paged_decode_attention, which also stores
 * the new K/V), o-projection, residual, RMSNorm, gate/up, SiLU(gate) * up, down, residual, with
 * the matmuls in fuselm_qlinear_ld. Steps where every token is a query row take it: single decode
 * tokens, and the rows of speculative tokens being verified (several rows of one sequence, each
 * with its own context length; their K/V are stored before attention, as the torch path does).
 * Steps with prompt chunks take each layer in two calls (fuselm_layer_attention_inputs / _outputs)
 * with attention in between, where the caller runs flash attention over the chunks: the eager
 * layer's elementwise ops (rotary, SiLU, residual adds, splits) cost ~10% of an offline run.
 * The torch model (fuselm/models/llama.py) is the reference it is tested against.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_simd.h"
#include "fuselm_kernels.h"
#include "softmax_exp.h"

static void project(const QProj *p, const float *x, float *y, int64_t M, int num_threads) {
    if (fuselm_qproject(p, x, y, M, num_threads)) return; /* quantised parts in one pass (quant_project.c) */
    int64_t total = 0, col = 0;
    for (int64_t i = 0; i < p->num_parts; i++) total += p->parts[i].n;
    for (int64_t i = 0; i < p->num_parts; i++) {
        const QPart *w = &p->parts[i];
        const float *bias = p->bias != NULL ? p->bias + col : NULL;
        if (w->bits == 32)
            fuselm_dense_linear(x, w->k, (const float *)w->qweight, bias, y + col, total, M, w->n, w->k, num_threads);
        else
            fuselm_qlinear_ld(x, w->qweight, w->scales, w->mins, bias, y + col, total, M, w->n, w->k, w->group, w->bits,
                              w->scale_dtype, 0 /* int16 activations */, num_threads);
        col += w->n;
    }
}

void fuselm_project(const QProj *p, const float *x, float *y, int64_t M, int num_threads) {
    project(p, x, y, M, num_threads);
}

/* act[m, i] = silu(gu[m, i]) * gu[m, I + i] for M rows of [gate | up]. Vectorised and split between
 * threads: with libm's expf, one element at a time, it took ~3% of a 128-row decode step. 16 lanes where
 * the build has AVX-512 (the same arithmetic per lane as the 8-lane loop, so the same bits): 1.25-1.56x
 * the 8-lane loop at 8-512 rows of SmolLM2's 1,536 (2-vCPU Zen 4 EPYC, two threads, alternated). */
void fuselm_silu_mul(const float *gu, float *act, int64_t M, int64_t I, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * I >= 16384)
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu + m * 2 * I, *u = g + I;
        float *a = act + m * I;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= I; i += 16) {
            const __m512 gv = _mm512_loadu_ps(g + i);
            /* exp256_clamped's clamp to [-87, 88], split and polynomial, as softmax's 16-lane exp computes them */
            const __m512 e = exp512_nonpositive(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(88.0f)));
            const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            _mm512_storeu_ps(a + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
        }
#endif
#if defined(__AVX2__) && defined(__FMA__)
        for (; i + 8 <= I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256_clamped(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
            _mm256_storeu_ps(a + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* x * cos + swap_halves(x) * signed_sin for `heads` heads of one row (HF rotate-half layout). */
static void rotate(float *x, const float *cos, const float *sin, int64_t heads, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * dim;
        int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
        for (; d + 8 <= half; d += 8) {
            const __m256 a = _mm256_loadu_ps(v + d), b = _mm256_loadu_ps(v + d + half);
            _mm256_storeu_ps(v + d, _mm256_fmadd_ps(a, _mm256_loadu_ps(cos + d), _mm256_mul_ps(b, _mm256_loadu_ps(sin + d))));
            _mm256_storeu_ps(v + d + half, _mm256_fmadd_ps(b, _mm256_loadu_ps(cos + d + half),
                                                           _mm256_mul_ps(a, _mm256_loadu_ps(sin + d + half))));
        }
#endif
        for (; d < half; d++) {
            const float a = v[d], b = v[d + half];
            v[d] = fmaf(a, cos[d], b * sin[d]);
            v[d + half] = fmaf(b, cos[d + half], a * sin[d + half]);
        }
    }
}

/* The half of a layer before attention, for M rows of the residual stream x [M, hidden]: RMSNorm,
 * q/k/v projection (+ bias), split into q [M, Hq*D], k and v [M, Hkv*D], the q/k RMSNorm where the layer has
 * one (per head: Qwen3; whole: OLMoE), the q/k/v clamp (OLMoE), rotary on q and k. h [M, hidden] and
 * qkv [M, qkv_dim] are scratch. */
static void attention_inputs(const QLayer *L, const QModelDims *dims, const float *x, int64_t M, const float *cos,
                             const float *sin, float *h, float *qkv, float *q, float *k, float *v) {
    const int64_t H = dims->hidden, D = dims->head_dim, Hq = dims->num_heads, Hkv = dims->num_kv_heads;
    const int64_t qkv_dim = (Hq + 2 * Hkv) * D;
    fuselm_rms_norm(x, L->input_norm, h, M, H, dims->eps, FUSELM_F32, dims->num_threads);
    project(&L->qkv, h, qkv, M, dims->num_threads);
#pragma omp parallel for schedule(static) num_threads(dims->num_threads) if (M >= 64)
    for (int64_t m = 0; m < M; m++) {
        const float *row = qkv + m * qkv_dim;
        if (L->q_norm != NULL) { /* each head (or the whole q / k) a row of fuselm_rms_norm, as the torch layers' */
            const int64_t qw = L->qk_norm_whole ? Hq * D : D, kw = L->qk_norm_whole ? Hkv * D : D;
            fuselm_rms_norm(row, L->q_norm, q + m * Hq * D, Hq * D / qw, qw, dims->eps, FUSELM_F32, 1);
            fuselm_rms_norm(row + Hq * D, L->k_norm, k + m * Hkv * D, Hkv * D / kw, kw, dims->eps, FUSELM_F32, 1);
        } else {
            memcpy(q + m * Hq * D, row, sizeof(float) * (size_t)(Hq * D));
            memcpy(k + m * Hkv * D, row + Hq * D, sizeof(float) * (size_t)(Hkv * D));
        }
        memcpy(v + m * Hkv * D, row + (Hq + Hkv) * D, sizeof(float) * (size_t)(Hkv * D));
        if (L->clip_qkv > 0.0f) {
            const float c = L->clip_qkv;
            float *parts[3] = {q + m * Hq * D, k + m * Hkv * D, v + m * Hkv * D};
            const int64_t sizes[3] = {Hq * D, Hkv * D, Hkv * D};
            for (int p = 0; p < 3; p++)
                for (int64_t i = 0; i < sizes[p]; i++) parts[p][i] = parts[p][i] < -c ? -c : parts[p][i] > c ? c : parts[p][i];
        }
        rotate(q + m * Hq * D, cos + m * D, sin + m * D, Hq, D);
        rotate(k + m * Hkv * D, cos + m * D, sin + m * D, Hkv, D);
    }
}

/* The half of a layer after attention: x += o_proj(attn); x += down(silu(gate) * up) of RMSNorm(x), or
 * the layer's MoE block of RMSNorm(x) (moe.c). h [M, hidden], gu [M, 2I], act [M, I] and out [M, hidden]
 * are scratch. */
static void attention_outputs(const QLayer *L, const QModelDims *dims, float *x, const float *attn, int64_t M, float *h,
                              float *gu, float *act, float *out) {
    const int64_t H = dims->hidden, I = dims->intermediate;
    const int threads = dims->num_threads;
    project(&L->o, attn, out, M, threads);
    for (int64_t i = 0; i < M * H; i++) x[i] += out[i];
    fuselm_rms_norm(x, L->post_norm, h, M, H, dims->eps, FUSELM_F32, threads);
    if (L->moe != NULL) {
        fuselm_moe_block(L->moe, h, out, M, threads);
    } else {
        project(&L->gate_up, h, gu, M, threads);
        fuselm_silu_mul(gu, act, M, I, threads);
        project(&L->down, act, out, M, threads);
    }
    for (int64_t i = 0; i < M * H; i++) x[i] += out[i];
}

/* Steps with prompt chunks take the layers in halves, attention in between done by the caller
 * (fuselm/models/llama.py: the C decode kernel for query rows, torch's flash attention for chunks). */
void fuselm_layer_attention_inputs(const QLayer *layers, int64_t l, const QModelDims *dims, const float *x, int64_t M,
                                   const float *cos, const float *sin, float *q, float *k, float *v) {
    const int64_t qkv_dim = (dims->num_heads + 2 * dims->num_kv_heads) * dims->head_dim;
    float *h = malloc(sizeof(float) * (size_t)(M * dims->hidden));
    float *qkv = malloc(sizeof(float) * (size_t)(M * qkv_dim));
    attention_inputs(&layers[l], dims, x, M, cos, sin, h, qkv, q, k, v);
    free(h), free(qkv);
}

void fuselm_layer_attention_outputs(const QLayer *layers, int64_t l, const QModelDims *dims, float *x, const float *attn,
                                    int64_t M) {
    const int64_t H = dims->hidden, I = dims->intermediate;
    float *h = malloc(sizeof(float) * (size_t)(M * H));
    float *gu = malloc(sizeof(float) * (size_t)(M * 2 * I));
    float *act = malloc(sizeof(float) * (size_t)(M * I));
    float *out = malloc(sizeof(float) * (size_t)(M * H));
    attention_outputs(&layers[l], dims, x, attn, M, h, gu, act, out);
    free(h), free(gu), free(act), free(out);
}

/* x [M, hidden] float32 in/out (the residual stream); cos/sin [M, head_dim] (sin with rotate-half's
 * sign); block_table [M, max_blocks] and ctx_lens [M] as for fuselm_paged_decode_attention. Rows
 * 0..num_single-1 are single-token rows (the attention kernel stores their K/V); the rest belong to
 * sequences with several query rows. `shared` (fuselm_kernels.h; NULL: none): groups of rows that share
 * leading blocks, whose attention then takes fuselm_cascade_attention. */
void fuselm_decode_layers(const QLayer *layers, int64_t num_layers, const QModelDims *dims, float *x, int64_t M,
                          int64_t num_single, const float *cos, const float *sin, const int64_t *block_table,
                          const int64_t *ctx_lens, const int64_t *shared) {
    const int64_t H = dims->hidden, D = dims->head_dim, Hq = dims->num_heads, Hkv = dims->num_kv_heads;
    const int64_t I = dims->intermediate, qkv_dim = (Hq + 2 * Hkv) * D;
    float *h = malloc(sizeof(float) * (size_t)(M * H));
    float *qkv = malloc(sizeof(float) * (size_t)(M * qkv_dim));
    float *q = malloc(sizeof(float) * (size_t)(M * Hq * D));
    float *k = malloc(sizeof(float) * (size_t)(M * Hkv * D));
    float *v = malloc(sizeof(float) * (size_t)(M * Hkv * D));
    float *attn = malloc(sizeof(float) * (size_t)(M * Hq * D));
    float *gu = malloc(sizeof(float) * (size_t)(M * 2 * I));
    float *act = malloc(sizeof(float) * (size_t)(M * I));
    float *out = malloc(sizeof(float) * (size_t)(M * H));
    for (int64_t l = 0; l < num_layers; l++) {
        const QLayer *L = &layers[l];
        attention_inputs(L, dims, x, M, cos, sin, h, qkv, q, k, v);
        if (dims->kv_dtype == FUSELM_I8) { /* int8 cache with per-token scales (paged_attention_int8.c) */
            if (num_single < M)
                fuselm_store_kv_rows_int8(L->k_cache, L->v_cache, L->k_scale, L->v_scale, k, v, num_single, M, block_table,
                                          ctx_lens, dims->max_blocks, Hkv, D, dims->block_size, FUSELM_F32);
            if (shared != NULL)
                fuselm_cascade_attention_int8(q, attn, L->k_cache, L->v_cache, L->k_scale, L->v_scale, k, v, num_single,
                                              block_table, ctx_lens, M, dims->max_blocks, Hq, Hkv, D, dims->block_size,
                                              dims->scale, FUSELM_F32, dims->num_threads, shared);
            else
                fuselm_paged_decode_attention_int8(q, attn, L->k_cache, L->v_cache, L->k_scale, L->v_scale, k, v,
                                                   num_single, block_table, ctx_lens, M, dims->max_blocks, Hq, Hkv, D,
                                                   dims->block_size, dims->scale, FUSELM_F32, dims->num_threads);
            attention_outputs(L, dims, x, attn, M, h, gu, act, out);
            continue;
        }
        if (num_single < M)
            fuselm_store_kv_rows(L->k_cache, L->v_cache, k, v, num_single, M, block_table, ctx_lens, dims->max_blocks,
                                 Hkv * D, dims->block_size, FUSELM_F32, dims->kv_dtype);
        if (shared != NULL) /* rows sharing leading blocks read them once (cascade_attention.c) */
            fuselm_cascade_attention(q, attn, L->k_cache, L->v_cache, k, v, num_single, block_table, ctx_lens, M,
                                     dims->max_blocks, Hq, Hkv, D, dims->block_size, dims->scale, FUSELM_F32,
                                     dims->kv_dtype, dims->num_threads, shared);
        else
            fuselm_paged_decode_attention(q, attn, L->k_cache, L->v_cache, k, v, num_single, block_table, ctx_lens, M, dims->max_blocks,
                                          Hq, Hkv, D, dims->block_size, dims->scale, FUSELM_F32, dims->kv_dtype, dims->num_threads);
        attention_outputs(L, dims, x, attn, M, h, gu, act, out);
    }
    free(h), free(qkv), free(q), free(k), free(v), free(attn), free(gu), free(act), free(out);
}
