/* float32 grouped experts of one MoE step in a single parallel region (moe.c hands over the step's grouping).
 *
 * moe.c's general path runs a step as five parallel regions (gather, gate/up items, SiLU, down items,
 * combine), each ending in a barrier where both threads wait for the slower one. At batch 32 an MoE layer
 * streams 201 MB of float32 experts in a few milliseconds per thread, and on a 2-vCPU VM whose other
 * processes or hypervisor take a vCPU away for a while, every barrier can wait out such a pause. Float
 * experts need no per-projection activation rounding, so here one region does it all:
 *
 * - gather the tokens of each expert into consecutive rows, then one barrier;
 * - one list of work items, taken in order from a shared counter: first every (expert, intermediate
 *   columns) item, which computes those columns of gate and of up for the expert's rows and applies
 *   SiLU(gate) * up to them at once, then every (expert, output columns) item of down, with the routing
 *   weight applied as its rows are written (an item's columns: the whole projection where the threads still
 *   get enough items, item_columns). A down item waits only for its own expert's gate/up items (a
 *   per-expert count), not for every expert's: items are handed out in list order, so by then they are all
 *   taken and nearly always done;
 * - one barrier, then the combine (each token's top_k rows summed in slot order).
 *
 * At decode's few rows (at most FLOAT_WHOLE_MAX_ROWS assignments) where the routed experts divide evenly between
 * the threads, each thread instead takes whole experts, gate, up, SiLU and down one after the other, as
 * moe_few_rows.c does for quantised ones: no item counter, no waiting on another thread's gate/up items, each
 * weight one call. One layer at batch 1, 8 layers cycled, in-process alternation on a 2-vCPU Zen 4 EPYC:
 * Mixtral-like 1,043 -> 904 us, Qwen2-MoE-like 872 -> 829 us; whole-model batch-1 decode of the float32 files
 * 1.04x / 1.03x, the same tokens.
 *
 * Every output is computed by the same calls in the same order as moe.c's general path (dense_linear.c
 * on one thread per piece, the same SiLU expression), so the results are the same bits.
 */
#include <stdint.h>
#include <stdlib.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fuselm_kernels.h"

#define FLOAT_CHUNK_MIN 64 /* the narrowest item: four of dense_linear.c's 16-column panels */
#define FLOAT_ITEMS_PER_THREAD 4 /* items of one projection per thread, at least, where columns can be cut */
#define FLOAT_WHOLE_MAX_ROWS 8 /* assignments up to which threads take whole experts (when they divide evenly) */

static inline void pause_briefly(void) {
#if defined(__x86_64__)
    _mm_pause();
#endif
}

/* Output columns per item of a projection n wide over `active` experts: the whole projection where that leaves
 * every thread FLOAT_ITEMS_PER_THREAD items, else halved until it does (not below FLOAT_CHUNK_MIN). Whole
 * projections stream each expert's weight in one call; 64-column items cut it into 256 KB pieces, each a new
 * start for the hardware prefetcher, with more hand-outs and waits: one layer, in-process alternation on a 2-vCPU
 * Zen 4 EPYC, the same bits, at 8 / 32 / 256 rows: Qwen2-MoE-like (64 experts of 256) 4.31 / 6.59 / 28.4 ms with
 * 64 columns -> 3.96 / 5.53 / 23.1 with 256; Mixtral-like (32 of 512) 5.01 / 23.2 ms at 32 / 256 rows with 64
 * columns -> 4.31 / 18.4 with 1,024. Whole models, float32, the same tokens: batch-32 decode 1.13x (Qwen2-MoE-like)
 * and 1.14x (Mixtral-like), Mixtral-like batch 8 1.16x, a Qwen2-MoE-like 1,024-token prompt 1.03x. */
static int64_t item_columns(int64_t n, int64_t active, int num_threads) {
    int64_t chunk = n;
    while (chunk > FLOAT_CHUNK_MIN && active * ((n + chunk - 1) / chunk) < FLOAT_ITEMS_PER_THREAD * (int64_t)num_threads)
        chunk = (chunk / 2 + 15) / 16 * 16;
    return chunk < FLOAT_CHUNK_MIN && n > FLOAT_CHUNK_MIN ? FLOAT_CHUNK_MIN : chunk;
}

/* y[rows, n0..n1) = x[rows, :] @ W_e[n0..n1, :]^T for the packed weight of expert e (one thread). */
static void expert_columns(const QPart *w, int64_t e, const float *x, int64_t ldx, int64_t rows, float *y, int64_t ldy,
                           int64_t n0, int64_t n1) {
    const float *packed = (const float *)w->qweight + e * fuselm_dense_packed_size(w->n, w->k) + n0 * w->k;
    fuselm_dense_linear(x, ldx, packed, NULL, y + n0, ldy, rows, n1 - n0, w->k, 1);
}

void fuselm_moe_float_experts(const float *x, int64_t T, int64_t top_k, const float *topk_weights, int64_t num_experts,
                              const int64_t *offsets, const int64_t *pos, const int64_t *src, const QPart *gate,
                              const QPart *up, const QPart *down, float *out, int num_threads) {
    const int64_t H = gate->k, I = gate->n, A = T * top_k;
    const MoeRows rows_of = fuselm_moe_rows(A, H, I);
    float *xs = rows_of.xs, *gu = rows_of.gu, *act = rows_of.act, *yd = rows_of.yd;
    int64_t *active = (int64_t *)malloc((size_t)num_experts * sizeof(int64_t)); /* experts with rows, in order */
    int64_t *done = (int64_t *)calloc((size_t)num_experts, sizeof(int64_t));   /* finished gate/up items per expert */
    int64_t num_active = 0, next_item = 0;
    for (int64_t e = 0; e < num_experts; e++)
        if (offsets[e + 1] > offsets[e]) active[num_active++] = e;
    const int64_t gate_up_width = item_columns(I, num_active, num_threads), down_width = item_columns(H, num_active, num_threads);
    const int64_t gate_up_chunks = (I + gate_up_width - 1) / gate_up_width, down_chunks = (H + down_width - 1) / down_width;
    const int64_t gate_up_items = num_active * gate_up_chunks, items = gate_up_items + num_active * down_chunks;
    if (num_threads > items) num_threads = (int)(items > 0 ? items : 1);
    const int whole_experts = A <= FLOAT_WHOLE_MAX_ROWS && num_active % num_threads == 0;

#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < A; p++) {
            const float *row = x + (src[p] / top_k) * H;
            for (int64_t h = 0; h < H; h++) xs[p * H + h] = row[h];
        }
        if (whole_experts) { /* each thread its run of experts end to end (static: equal contiguous runs) */
#pragma omp for schedule(static) nowait
            for (int64_t j = 0; j < num_active; j++) {
                const int64_t e = active[j], r0 = offsets[e], rows = offsets[e + 1] - r0;
                expert_columns(gate, e, xs + r0 * H, H, rows, gu + r0 * 2 * I, 2 * I, 0, I);
                expert_columns(up, e, xs + r0 * H, H, rows, gu + r0 * 2 * I + I, 2 * I, 0, I);
                fuselm_moe_silu_mul(gu, act, I, r0, rows, 0, I);
                expert_columns(down, e, act + r0 * I, I, rows, yd + r0 * H, H, 0, H);
                fuselm_moe_weigh(yd, H, r0, rows, 0, H, topk_weights, src); /* epilogue: the routing weight */
            }
        } else {
            for (;;) {
                const int64_t i = __atomic_fetch_add(&next_item, 1, __ATOMIC_RELAXED);
                if (i >= items) break;
                if (i < gate_up_items) {
                    const int64_t e = active[i / gate_up_chunks], r0 = offsets[e], rows = offsets[e + 1] - r0;
                    const int64_t n0 = i % gate_up_chunks * gate_up_width;
                    const int64_t n1 = n0 + gate_up_width < I ? n0 + gate_up_width : I;
                    expert_columns(gate, e, xs + r0 * H, H, rows, gu + r0 * 2 * I, 2 * I, n0, n1);
                    expert_columns(up, e, xs + r0 * H, H, rows, gu + r0 * 2 * I + I, 2 * I, n0, n1);
                    fuselm_moe_silu_mul(gu, act, I, r0, rows, n0, n1);
                    __atomic_add_fetch(&done[e], 1, __ATOMIC_RELEASE);
                    continue;
                }
                const int64_t d = i - gate_up_items, e = active[d / down_chunks], r0 = offsets[e];
                const int64_t rows = offsets[e + 1] - r0;
                const int64_t n0 = d % down_chunks * down_width, n1 = n0 + down_width < H ? n0 + down_width : H;
                while (__atomic_load_n(&done[e], __ATOMIC_ACQUIRE) < gate_up_chunks) pause_briefly();
                expert_columns(down, e, act + r0 * I, I, rows, yd + r0 * H, H, n0, n1);
                fuselm_moe_weigh(yd, H, r0, rows, n0, n1, topk_weights, src); /* epilogue: the routing weight */
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) fuselm_moe_combine(out, yd, pos, t, top_k, H, 0, H);
    }
    free(done), free(active);
}
