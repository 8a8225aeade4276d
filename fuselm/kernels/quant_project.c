/* A fused projection's quantised parts (q, k and v of one layer) in one pass: activations rounded once,
 * one parallel region.
 *
 * decode_layers.c's `project` ran each part as its own fuselm_qlinear_ld call, so a GGUF layer's q/k/v
 * (three QuantWeights side by side) rounded the same activations three times and forked the threads
 * three times. At batch 1 on a Mixtral-like layer (hidden 1024, Q4_0) that was a sixth of the
 * projection's time, and each fork costs the most on a 2-vCPU VM whose vCPUs lose time to steal.
 * Here the parts share one QActs (quant_rows.c) and their rows are cut into items of QP_CHUNK rows,
 * handed out statically, each thread a contiguous run: a call's weight prefetch runs past the end of its rows
 * into the next item, which is then the same thread's (handed out dynamically, it was often the other
 * thread's; moe_few_rows.c found the same). llama.cpp's Mixtral-like Q4_0 / Q8_0 files at batch 1 on a 2-vCPU
 * Zen 4 EPYC, three alternated rounds: 111-131 / 86-106 tok/s against 107-112 / 81-85 dynamically; the
 * embedded SmolLM2-135M Q4_1 there: 211-226 against 157-188.
 * Each output row is computed by fuselm_qrows exactly as fuselm_qlinear_ld computes it (the bias added after
 * the row's sum), so the result is the same bits.
 * A part in int4_rows16.c's or int8_rows16.c's tiles (scales NULL) runs on their kernel over the same
 * activations (QP_CHUNK is a multiple of their sixteen-row groups).
 */
#include <stdint.h>
#include <stdlib.h>

#include "fuselm_kernels.h"

#define QP_CHUNK 64 /* weight rows per work item: long enough runs for the rows' prefetching */

int fuselm_qproject(const QProj *p, const float *x, float *y, int64_t M, int num_threads) {
    const QPart *first = &p->parts[0];
    int64_t total = 0, items = 0, tiled = 0;
    for (int64_t i = 0; i < p->num_parts; i++) {
        const QPart *w = &p->parts[i];
        if (w->bits == 32 || w->bits != first->bits || w->group != first->group || w->k != first->k) return 0;
        total += w->n;
        items += (w->n + QP_CHUNK - 1) / QP_CHUNK;
        tiled += w->scales == NULL; /* g32 in int4_rows16.c's or int8_rows16.c's tiles */
    }
    /* tiles read the split activations at any K % 32, rows only where fuselm_qrows_read_split says (int4 at
     * K % 128 with VNNI) */
    if (tiled && tiled < p->num_parts && !fuselm_qrows_read_split(first->bits, first->k)) return 0;
    QActs acts;
    if (tiled ? !fuselm_qacts_prepare_tiles(&acts, x, first->k, M, first->k, first->bits, num_threads)
              : !fuselm_qacts_prepare(&acts, x, first->k, M, first->k, first->group, first->bits, num_threads))
        return 0;
    int64_t part_of[FUSELM_MAX_PARTS + 1], col_of[FUSELM_MAX_PARTS]; /* items of part i: [part_of[i], part_of[i+1]) */
    part_of[0] = 0;
    for (int64_t i = 0, col = 0; i < p->num_parts; i++) {
        part_of[i + 1] = part_of[i] + (p->parts[i].n + QP_CHUNK - 1) / QP_CHUNK;
        col_of[i] = col, col += p->parts[i].n;
    }
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t item = 0; item < items; item++) {
        int64_t i = 0;
        while (item >= part_of[i + 1]) i++;
        const QPart *w = &p->parts[i];
        const int64_t n0 = (item - part_of[i]) * QP_CHUNK, n1 = n0 + QP_CHUNK < w->n ? n0 + QP_CHUNK : w->n;
        float *out = y + col_of[i];
        if (w->scales == NULL)
            fuselm_rows16(&acts, 0, M, w->qweight, w->bits, w->scale_dtype, n0, n1, out, total);
        else
            fuselm_qrows(&acts, 0, M, w->qweight, w->scales, w->mins, w->scale_dtype, n0, n1, out, total);
        if (p->bias != NULL) {
            const float *bias = p->bias + col_of[i];
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = n0; n < n1; n++) out[m * total + n] += bias[n];
        }
    }
    fuselm_qacts_release(&acts);
    return 1;
}
