/* The routed experts of a decode step's few rows, quantised, in one parallel region.
 *
 * At batch 1 a Mixtral-like layer's four routed int4 experts (hidden 1024, 512 wide) are ~4 MB and
 * ~65 us of arithmetic on two cores. kernels/moe.c's general path, built for batches, forks the threads
 * twice (gate/up items, then down items) and runs the SiLU, the activation rounding for down and the
 * combine on one thread between and after them. Here, when a call has at most MOE_FEW_MAX_ROWS
 * (token, slot) assignments and quantised experts:
 *
 * - one region: gate/up items (MOE_FEW_CHUNK intermediate rows of one expert, gate then up) each end
 *   with the SiLU of their own columns, so no pass over [gate | up] remains after them;
 * - a barrier; one thread rounds the SiLU output for down (a few thousand values), a barrier;
 * - down items (MOE_FEW_CHUNK output columns of every routed expert) each end with the routing weight
 *   and the combine of their columns, so the region ends when the output is complete.
 *
 * Items are handed out statically, each thread a contiguous run: a call's weight prefetch runs past the end of
 * its rows into the next item's, which is then the same thread's (handed out dynamically, the next item was
 * often the other thread's, and the prefetch traffic lost). llama.cpp's Q4_0 / Q8_0 Mixtral-like file at batch
 * 1 on a 2-vCPU Zen 4 EPYC: 111-116 / 81-92 tok/s against 103-108 / 78-80.
 *
 * Where the routed experts divide evenly between the threads (batch 1 with top-k a multiple of the thread
 * count: top-2 to top-8 on 2 threads), each thread takes whole experts instead (experts_by_thread): gate, up,
 * SiLU, the rounding of its own rows for down, and down with the routing weight, one expert after the other,
 * then a single barrier and the combine split by columns. No thread waits for the other between gate/up and
 * down, and each weight is one run of calls. One layer of random weights, batch 1, 2 threads on a Zen 4 EPYC,
 * in-process alternation (12 rounds, medians): int4 Mixtral-like (32 of 512, top-4) 150 -> 136 us,
 * Qwen2-MoE-like (64 of 256, top-8) 155 -> 144 us; int8 unchanged (265-292 against 273-288 us). Threads that
 * would get no expert or unequal counts keep the items above.
 *
 * The arithmetic is moe.c's to the bit: the same quant_rows.c calls per (expert, rows), the same SiLU
 * expression, the same routing-weight product and the same slot-order sum, so a token's output is the
 * same whichever path ran it (tests/test_moe_kernel.py checks a token alone against it in a batch).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuselm_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define MOE_FEW_MAX_ROWS 8 /* assignments (tokens x top_k) up to which this path runs */
#define MOE_FEW_CHUNK 64   /* weight rows per call of an item: long runs for quant_rows.c's prefetching */

static int quantised(const QPart *w) {
    return w->bits == 4 || w->bits == 8;
}

/* Expert e's first weight row, scales and mins in a stacked QPart. */
static void expert_part(const QPart *w, int64_t e, const void **q, const void **s, const void **m) {
    const int64_t groups = w->k / w->group, scale_size = w->scale_dtype == FUSELM_F16 ? 2 : 4;
    const int64_t row_bytes = w->bits == 4 ? w->k / 2 : w->k;
    *q = (const char *)w->qweight + e * w->n * row_bytes;
    *s = (const char *)w->scales + e * w->n * groups * scale_size;
    *m = w->mins != NULL ? (const char *)w->mins + e * w->n * groups * scale_size : NULL;
}

/* Rows [n0, n1) of expert e of w for sorted rows [r0, r0 + rows), into y (row r0 of the output, stride ldy). */
static void expert_rows(const QPart *w, int64_t e, const QActs *acts, int64_t r0, int64_t rows, int64_t n0, int64_t n1,
                        float *y, int64_t ldy) {
    if (w->scales == NULL) { /* int4 or int8 tiles (int4_rows16.c, int8_rows16.c) */
        fuselm_rows16_expert(w, e, acts, r0, rows, n0, n1, y - r0 * ldy, ldy);
        return;
    }
    const void *q, *s, *m;
    expert_part(w, e, &q, &s, &m);
    fuselm_qrows(acts, r0, rows, q, s, m, w->scale_dtype, n0, n1, y - r0 * ldy, ldy);
}

/* The routed experts (active of them, rows grouped by expert from first_row) with each thread taking whole
 * experts, active a multiple of num_threads; 0 where down's activations could not be prepared (nothing written
 * to out). The same calls per (expert, rows) and the same epilogue as the items' path, so the same bits. */
static int experts_by_thread(int64_t T, int64_t top_k, const float *topk_weights, const int64_t *src, const int64_t *pos,
                             const int64_t *expert_of, const int64_t *first_row, const int64_t *row_count, int64_t active,
                             const QPart *gate, const QPart *up, const QPart *down, const QActs *acts_gate,
                             const QActs *acts_up, float *gu, float *act, float *yd, float *out, int num_threads) {
    const int64_t H = gate->k, I = gate->n;
    int ready = 1;
#pragma omp parallel num_threads(num_threads)
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t t = 0, nt = 1;
#endif
        const int64_t j0 = active * t / nt, j1 = active * (t + 1) / nt; /* this thread's experts, maybe none */
        const int64_t r0 = j1 > j0 ? first_row[j0] : 0, r1 = j1 > j0 ? first_row[j1 - 1] + row_count[j1 - 1] : 0;
        for (int64_t j = j0; j < j1; j++) {
            const int64_t a0 = first_row[j], rows = row_count[j];
            expert_rows(gate, expert_of[j], acts_gate, a0, rows, 0, I, gu + a0 * 2 * I, 2 * I);
            expert_rows(up, expert_of[j], acts_up, a0, rows, 0, I, gu + a0 * 2 * I + I, 2 * I);
            fuselm_moe_silu_mul(gu, act, I, a0, rows, 0, I);
        }
        QActs acts_down; /* this thread's rows only: rounding is per row */
        memset(&acts_down, 0, sizeof acts_down);
        if (j1 == j0 || fuselm_qacts_prepare_part(&acts_down, down, act + r0 * I, I, r1 - r0, 1)) {
            for (int64_t j = j0; j < j1; j++) {
                const int64_t a0 = first_row[j], rows = row_count[j];
                expert_rows(down, expert_of[j], &acts_down, a0 - r0, rows, 0, H, yd + a0 * H, H);
                fuselm_moe_weigh(yd, H, a0, rows, 0, H, topk_weights, src); /* epilogue: the routing weight */
            }
        } else {
#pragma omp atomic write
            ready = 0;
        }
        fuselm_qacts_release(&acts_down);
#pragma omp barrier
        int all_ready;
#pragma omp atomic read
        all_ready = ready;
        const int64_t h0 = H * t / nt, h1 = H * (t + 1) / nt; /* the combine of this thread's columns */
        if (all_ready)
            for (int64_t tok = 0; tok < T; tok++) fuselm_moe_combine(out, yd, pos, tok, top_k, H, h0, h1);
    }
    return ready;
}

int fuselm_moe_experts_few(const float *x, int64_t T, int64_t top_k, const int64_t *topk_ids, const float *topk_weights,
                           int64_t num_experts, const QPart *gate, const QPart *up, const QPart *down, float *out,
                           int float_activations, int num_threads) {
    const int64_t H = gate->k, I = gate->n, A = T * top_k;
    if (A == 0 || A > MOE_FEW_MAX_ROWS || float_activations || !quantised(gate) || !quantised(up) || !quantised(down))
        return 0;
    int64_t expert_of[MOE_FEW_MAX_ROWS], first_row[MOE_FEW_MAX_ROWS], row_count[MOE_FEW_MAX_ROWS];
    int64_t pos[MOE_FEW_MAX_ROWS], src[MOE_FEW_MAX_ROWS], active = 0;
    /* assignments grouped by expert (ascending id, slot order within one), as moe.c's counting sort */
    for (int64_t e = 0, p = 0; e < num_experts && p < A; e++) {
        int64_t rows = 0;
        for (int64_t a = 0; a < A; a++)
            if (topk_ids[a] == e) pos[a] = p + rows, src[p + rows] = a, rows++;
        if (rows == 0) continue;
        expert_of[active] = e, first_row[active] = p, row_count[active] = rows, active++;
        p += rows;
    }
    float *xs = (float *)malloc((size_t)(A * H) * sizeof(float));     /* [A, H] tokens by expert */
    float *gu = (float *)malloc((size_t)(A * 2 * I) * sizeof(float)); /* [A, 2I] gate | up */
    float *act = (float *)malloc((size_t)(A * I) * sizeof(float));    /* [A, I] silu(gate) * up */
    float *yd = (float *)malloc((size_t)(A * H) * sizeof(float));     /* [A, H] weighted expert outputs */
    for (int64_t p = 0; p < A; p++) memcpy(xs + p * H, x + (src[p] / top_k) * H, (size_t)H * sizeof(float));
    QActs acts_gate, acts_up, acts_down;
    memset(&acts_up, 0, sizeof acts_up), memset(&acts_down, 0, sizeof acts_down);
    int ready = fuselm_qacts_prepare_part(&acts_gate, gate, xs, H, A, 1);
    const int shared_acts = ready && fuselm_qacts_fit(&acts_gate, up);
    if (shared_acts)
        acts_up = acts_gate;
    else
        ready = ready && fuselm_qacts_prepare_part(&acts_up, up, xs, H, A, 1);
    int down_ready = 1;
    const int64_t up_items = (I + MOE_FEW_CHUNK - 1) / MOE_FEW_CHUNK, down_items = (H + MOE_FEW_CHUNK - 1) / MOE_FEW_CHUNK;
#ifdef _OPENMP
    const int64_t threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
    const int64_t threads = 1;
#endif
    if (ready && active % threads == 0) {
        down_ready = experts_by_thread(T, top_k, topk_weights, src, pos, expert_of, first_row, row_count, active, gate, up,
                                       down, &acts_gate, &acts_up, gu, act, yd, out, num_threads);
    } else if (ready) {
#pragma omp parallel num_threads(num_threads)
        {
#pragma omp for schedule(static)
            for (int64_t item = 0; item < active * up_items; item++) {
                const int64_t j = item / up_items, n0 = (item % up_items) * MOE_FEW_CHUNK;
                const int64_t n1 = n0 + MOE_FEW_CHUNK < I ? n0 + MOE_FEW_CHUNK : I;
                const int64_t r0 = first_row[j], rows = row_count[j];
                expert_rows(gate, expert_of[j], &acts_gate, r0, rows, n0, n1, gu + r0 * 2 * I, 2 * I);
                expert_rows(up, expert_of[j], &acts_up, r0, rows, n0, n1, gu + r0 * 2 * I + I, 2 * I);
                fuselm_moe_silu_mul(gu, act, I, r0, rows, n0, n1);
            }
#pragma omp single
            down_ready = fuselm_qacts_prepare_part(&acts_down, down, act, I, A, 1);
            if (down_ready) {
#pragma omp for schedule(static)
                for (int64_t item = 0; item < down_items; item++) {
                    const int64_t n0 = item * MOE_FEW_CHUNK, n1 = n0 + MOE_FEW_CHUNK < H ? n0 + MOE_FEW_CHUNK : H;
                    for (int64_t j = 0; j < active; j++) {
                        const int64_t r0 = first_row[j], rows = row_count[j];
                        expert_rows(down, expert_of[j], &acts_down, r0, rows, n0, n1, yd + r0 * H, H);
                        fuselm_moe_weigh(yd, H, r0, rows, n0, n1, topk_weights, src); /* the routing weight */
                    }
                    for (int64_t t = 0; t < T; t++) /* the combine of these columns */
                        fuselm_moe_combine(out, yd, pos, t, top_k, H, n0, n1);
                }
            }
        }
    }
    if (!shared_acts) fuselm_qacts_release(&acts_up);
    fuselm_qacts_release(&acts_gate);
    fuselm_qacts_release(&acts_down);
    free(yd), free(act), free(gu), free(xs);
    return ready && down_ready;
}
