/* Mixture-of-experts feed-forward on CPU: every routed expert of one step in one call.
 *
 * Each token picks top_k experts; run naively (a loop over experts in Python, or per token), an
 * expert's weights are read once per token that chose it, or the step pays one framework call per
 * expert. Here the step's (token, slot) assignments are grouped by expert with a counting sort, the
 * tokens of each expert are gathered into consecutive rows, and each active expert's gate, up and
 * down weights are read once for all its rows (a grouped GEMM). Work is cut into items of one
 * expert x MOE_CHUNK output rows of one projection, handed to the threads dynamically, so an expert
 * with every token and an expert with none cost what their rows cost. The routing weight multiplies
 * the down projection's rows as they are written (its epilogue); the combine sums each token's
 * top_k rows in slot order, so a token's output does not depend on what else is in the batch.
 *
 * Weights: one QPart per projection describes all experts laid end to end (expert e's rows follow
 * expert e - 1's): bits 4/8 are quant_linear.c's formats (a stacked QuantWeight of num_experts * n
 * rows, as GGUF stores ffn_*_exps), bits 32 is dense_linear.c's panel layout packed per expert
 * (fuselm_dense_packed_size(n, k) floats each). Each item calls those kernels single-threaded on
 * its rows, so the arithmetic of one row is theirs exactly.
 *
 * fuselm_moe_block adds the router in front (logits, softmax, top-k), so that the one-call C layer step
 * (decode_layers.c) runs an MoE layer's feed-forward without returning to Python.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuselm_kernels.h"

#define MOE_CHUNK 64 /* output rows per work item: a multiple of dense_linear.c's 16-column panels */
#define MOE_THREADED_COPY 65536 /* values from which gathering, SiLU and combining run on every thread */

typedef struct {
    int64_t expert, proj, n0, n1; /* proj 0 gate, 1 up, 2 down */
} MoeItem;

/* Expert e's rows [n0, n1) of w for the sorted batch's rows [r0, r0 + M) (x: row r0 of the batch, row stride
 * ldx), written to columns [n0, n1) of y (row r0 of the output, row stride ldy). Quantised weights read the
 * activations `acts` rounded once for the whole call (quant_rows.c) when it holds them. */
static void expert_rows(const QPart *w, int64_t e, const QActs *acts, int64_t r0, const float *x, int64_t ldx, int64_t M,
                        float *y, int64_t ldy, int64_t n0, int64_t n1, int float_activations) {
    if (w->bits != 32 && w->scales == NULL) { /* int4 or int8 tiles (int4_rows16.c, int8_rows16.c) */
        fuselm_rows16_expert(w, e, acts, r0, M, n0, n1, y - r0 * ldy, ldy);
        return;
    }
    if (w->bits == 32) {
        const float *packed = (const float *)w->qweight + e * fuselm_dense_packed_size(w->n, w->k) + n0 * w->k;
        fuselm_dense_linear(x, ldx, packed, NULL, y + n0, ldy, M, n1 - n0, w->k, 1);
        return;
    }
    const int64_t groups = w->k / w->group, scale_size = w->scale_dtype == FUSELM_F16 ? 2 : 4;
    const int64_t row_bytes = w->bits == 4 ? w->k / 2 : w->k;
    const char *q = (const char *)w->qweight + e * w->n * row_bytes;
    const char *s = (const char *)w->scales + e * w->n * groups * scale_size;
    const char *m = w->mins != NULL ? (const char *)w->mins + e * w->n * groups * scale_size : NULL;
    if (acts->layout != FUSELM_QACTS_NONE) {
        fuselm_qrows(acts, r0, M, q, s, m, w->scale_dtype, n0, n1, y - r0 * ldy, ldy);
        return;
    }
    q += n0 * row_bytes, s += n0 * groups * scale_size, m = m != NULL ? m + n0 * groups * scale_size : NULL;
    fuselm_qlinear_ld(x, q, s, m, NULL, y + n0, ldy, M, n1 - n0, w->k, w->group, w->bits, w->scale_dtype,
                      float_activations, 1);
}

/* x [A, k] rounded once for every item of projection w; `acts` stays empty (layout NONE) for float weights,
 * float activations, or where quant_rows.c cannot run. `same`: an already prepared QActs, shared when it fits. */
static void prepare_acts(QActs *acts, const QActs *same, const QPart *w, const float *x, int64_t A,
                         int float_activations, int num_threads) {
    memset(acts, 0, sizeof *acts);
    if (same != NULL && fuselm_qacts_fit(same, w))
        *acts = *same;
    else if (w->bits != 32 && (!float_activations || w->scales == NULL)) /* tiles take only rounded ones */
        fuselm_qacts_prepare_part(acts, w, x, w->k, A, num_threads);
}

/* Items for the given projections of every expert with rows: MOE_CHUNK output rows each. */
static int64_t make_items(MoeItem *items, const int64_t *offsets, int64_t num_experts, const int64_t *projs,
                          int64_t num_projs, int64_t n) {
    int64_t count = 0;
    for (int64_t e = 0; e < num_experts; e++) {
        if (offsets[e + 1] == offsets[e]) continue;
        for (int64_t p = 0; p < num_projs; p++)
            for (int64_t n0 = 0; n0 < n; n0 += MOE_CHUNK) {
                const MoeItem item = {e, projs[p], n0, n0 + MOE_CHUNK < n ? n0 + MOE_CHUNK : n};
                items[count++] = item;
            }
    }
    return count;
}

/* The calling thread's scratch for a step's grouped rows, kept between steps and grown when a step needs more.
 * A 1,024-token prompt chunk of the Qwen2-MoE-like benchmark shape (8,192 assignments) needs 88 MB a layer; malloc
 * hands out buffers that large as fresh pages and returns them at free, so every layer of every chunk faulted them
 * in again, the kernel zeroing each page: ~520,000 page faults a 1,024-token float32 prompt, 3.29-3.36 s against
 * 2.73-2.77 s with this (2-vCPU Zen 4 EPYC; Mixtral-like 2.30 -> 1.85 s). NULL where it cannot grow. */
float *fuselm_moe_scratch(int64_t floats) {
    static __thread float *buf;
    static __thread int64_t cap;
    if (floats > cap) {
        free(buf);
        buf = (float *)malloc((size_t)floats * sizeof(float));
        cap = buf != NULL ? floats : 0;
    }
    return buf;
}

/* out [T, hidden] = sum over each token's top_k slots of weight * down(silu(gate(x)) * up(x)) of the
 * slot's expert. topk_ids/topk_weights [T, top_k]; ids must lie in [0, num_experts). gate/up: n =
 * intermediate, k = hidden; down: n = hidden, k = intermediate. */
void fuselm_moe_experts(const float *x, int64_t T, int64_t top_k, const int64_t *topk_ids, const float *topk_weights,
                        int64_t num_experts, const QPart *gate, const QPart *up, const QPart *down, float *out,
                        int float_activations, int num_threads) {
    const int64_t H = gate->k, I = gate->n, A = T * top_k;
    if (A == 0) return;
    if (fuselm_moe_experts_few(x, T, top_k, topk_ids, topk_weights, num_experts, gate, up, down, out, float_activations,
                               num_threads))
        return; /* a decode step's few quantised rows: one parallel region (moe_few_rows.c) */
    int64_t *offsets = (int64_t *)calloc((size_t)(num_experts + 1), sizeof(int64_t));
    int64_t *cursor = (int64_t *)malloc((size_t)num_experts * sizeof(int64_t));
    int64_t *pos = (int64_t *)malloc((size_t)A * sizeof(int64_t)); /* assignment -> sorted row */
    int64_t *src = (int64_t *)malloc((size_t)A * sizeof(int64_t)); /* sorted row -> assignment */
    for (int64_t a = 0; a < A; a++) offsets[topk_ids[a] + 1]++;
    for (int64_t e = 0; e < num_experts; e++) offsets[e + 1] += offsets[e], cursor[e] = offsets[e];
    for (int64_t a = 0; a < A; a++) {
        const int64_t p = cursor[topk_ids[a]]++;
        pos[a] = p, src[p] = a;
    }
    if (gate->bits == 32 && up->bits == 32 && down->bits == 32) { /* one parallel region (moe_float.c) */
        fuselm_moe_float_experts(x, T, top_k, topk_weights, num_experts, offsets, pos, src, gate, up, down, out, num_threads);
        free(src), free(pos), free(cursor), free(offsets);
        return;
    }
    /* the copies and the SiLU are a few microseconds at decode: forking the threads for them costs more */
    const int copy_threads = A * (H > I ? H : I) >= MOE_THREADED_COPY;
    const MoeRows rows_of = fuselm_moe_rows(A, H, I);
    float *xs = rows_of.xs, *gu = rows_of.gu, *act = rows_of.act, *yd = rows_of.yd;
    const int64_t most_rows = H > I ? H : I;
    MoeItem *items = (MoeItem *)malloc((size_t)(num_experts * 2 * ((most_rows + MOE_CHUNK - 1) / MOE_CHUNK)) *
                                       sizeof(MoeItem));

#pragma omp parallel for schedule(static) num_threads(num_threads) if (copy_threads)
    for (int64_t p = 0; p < A; p++) {
        const float *row = x + (src[p] / top_k) * H;
        for (int64_t h = 0; h < H; h++) xs[p * H + h] = row[h];
    }

    QActs acts_gate, acts_up, acts_down;
    prepare_acts(&acts_gate, NULL, gate, xs, A, float_activations, num_threads);
    prepare_acts(&acts_up, &acts_gate, up, xs, A, float_activations, num_threads);

    const int64_t gate_up[2] = {0, 1}, down_only[1] = {2};
    int64_t num_items = make_items(items, offsets, num_experts, gate_up, 2, I);
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t i = 0; i < num_items; i++) {
        const MoeItem it = items[i];
        const int64_t r0 = offsets[it.expert], rows = offsets[it.expert + 1] - r0;
        expert_rows(it.proj == 0 ? gate : up, it.expert, it.proj == 0 ? &acts_gate : &acts_up, r0, xs + r0 * H, H, rows,
                    gu + r0 * 2 * I + it.proj * I, 2 * I, it.n0, it.n1, float_activations);
    }

#pragma omp parallel for schedule(static) num_threads(num_threads) if (copy_threads)
    for (int64_t p = 0; p < A; p++) fuselm_moe_silu_mul(gu, act, I, p, 1, 0, I);

    if (acts_up.xs != acts_gate.xs) fuselm_qacts_release(&acts_up);
    fuselm_qacts_release(&acts_gate);
    prepare_acts(&acts_down, NULL, down, act, A, float_activations, num_threads);

    num_items = make_items(items, offsets, num_experts, down_only, 1, H);
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t i = 0; i < num_items; i++) {
        const MoeItem it = items[i];
        const int64_t r0 = offsets[it.expert], rows = offsets[it.expert + 1] - r0;
        expert_rows(down, it.expert, &acts_down, r0, act + r0 * I, I, rows, yd + r0 * H, H, it.n0, it.n1, float_activations);
        fuselm_moe_weigh(yd, H, r0, rows, it.n0, it.n1, topk_weights, src); /* epilogue: the routing weight */
    }

#pragma omp parallel for schedule(static) num_threads(num_threads) if (copy_threads)
    for (int64_t t = 0; t < T; t++) fuselm_moe_combine(out, yd, pos, t, top_k, H, 0, H);
    fuselm_qacts_release(&acts_down);
    free(items);
    free(src), free(pos), free(cursor), free(offsets);
}

/* Each row's router logits [M, E] -> its top_k experts (the largest probability first, the lower id on a
 * tie) and their weights: softmax in float32, renormalised over the k when asked, as fuselm/layers/moe.py's
 * `route` does with torch.softmax and torch.topk. */
static void route_rows(const float *logits, int64_t M, int64_t E, int64_t top_k, int renormalize, int64_t *ids,
                       float *weights) {
    for (int64_t m = 0; m < M; m++) {
        const float *l = logits + m * E;
        int64_t *id = ids + m * top_k;
        float *w = weights + m * top_k;
        float most = l[0], sum = 0.0f;
        for (int64_t e = 1; e < E; e++) most = l[e] > most ? l[e] : most;
        for (int64_t e = 0; e < E; e++) sum += expf(l[e] - most);
        for (int64_t j = 0; j < top_k; j++) { /* k passes: k is small (2-8) */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j; i++) taken |= id[i] == e;
                if (!taken && (best < 0 || l[e] > l[best])) best = e;
            }
            id[j] = best, w[j] = expf(l[best] - most) / sum;
        }
        if (renormalize) {
            float total = 0.0f;
            for (int64_t j = 0; j < top_k; j++) total += w[j];
            for (int64_t j = 0; j < top_k; j++) w[j] /= total;
        }
    }
}

/* out += sigmoid(shared_gate(h)) * shared_down(silu(g) * u), [g | u] = shared_gate_up(h): Qwen2-MoE's shared
 * expert, added after the routed experts' sum as fuselm/layers/moe.py's MoEBlock adds it. */
static void shared_expert(const QMoe *moe, const float *h, float *out, int64_t M, int num_threads) {
    const int64_t H = moe->gate.k, I = moe->shared_intermediate;
    float *gu = (float *)malloc((size_t)(M * 2 * I) * sizeof(float));
    float *act = (float *)malloc((size_t)(M * I) * sizeof(float));
    float *y = (float *)malloc((size_t)(M * H) * sizeof(float));
    float *gate = (float *)malloc((size_t)M * sizeof(float));
    fuselm_project(moe->shared_gate_up, h, gu, M, num_threads);
    fuselm_silu_mul(gu, act, M, I, num_threads);
    fuselm_project(moe->shared_down, act, y, M, num_threads);
    fuselm_project(moe->shared_gate, h, gate, M, num_threads);
    for (int64_t m = 0; m < M; m++) {
        const float s = 1.0f / (1.0f + expf(-gate[m]));
        for (int64_t i = 0; i < H; i++) out[m * H + i] += s * y[m * H + i];
    }
    free(gate), free(y), free(act), free(gu);
}

void fuselm_moe_block(const QMoe *moe, const float *h, float *out, int64_t M, int num_threads) {
    const int64_t E = moe->num_experts, k = moe->top_k;
    float *logits = (float *)malloc((size_t)(M * E) * sizeof(float));
    float *weights = (float *)malloc((size_t)(M * k) * sizeof(float));
    fuselm_project(&moe->router, h, logits, M, num_threads);
    route_rows(logits, M, E, k, moe->renormalize, moe->routed_ids, weights);
    fuselm_moe_experts(h, M, k, moe->routed_ids, weights, E, &moe->gate, &moe->up, &moe->down, out,
                       moe->float_activations, num_threads);
    free(weights), free(logits);
    if (moe->shared_gate_up != NULL) shared_expert(moe, h, out, M, num_threads);
}
