/* The sixteen-row tiles' entry points by weight width: int4 (int4_rows16.c) or int8 (int8_rows16.c).
 *
 * A weight in tiles reaches the C side as a QPart (or qweight pointer) with scales NULL and its bits; every
 * reader (moe.c and moe_few_rows.c for experts, quant_project.c for the C layer step's projections,
 * quant_linear.c for a whole layer) goes through these, so the choice of kernel by width is made here once.
 */
#include <stddef.h>
#include <stdint.h>

#include "fuselm_kernels.h"

/* weight rows per work item of a dense layer (fuselm_rows16_linear), handed out statically as quant_project.c's:
 * each thread's run is contiguous, so the weight prefetch past an item's end lands in its own next item. One
 * row, int4, weights from memory, 2 threads on a Zen 4 EPYC: 1536 x 1024 in 37-38 us against 44-46 dynamically,
 * 2048 x 2048 in 87-89 against 93 */
#define R16_CHUNK_ROWS 64

void fuselm_rows16(const QActs *a, int64_t m0, int64_t rows, const void *tiles, int bits, int scale_dtype, int64_t n0,
                   int64_t n1, float *y, int64_t ldy) {
    if (bits == 8)
        fuselm_int8_rows16(a, m0, rows, tiles, scale_dtype, n0, n1, y, ldy);
    else
        fuselm_int4_rows16(a, m0, rows, tiles, scale_dtype, n0, n1, y, ldy);
}

void fuselm_rows16_linear(const float *x, const void *tiles, int bits, int scale_dtype, const float *bias, float *y,
                          int64_t ldy, int64_t M, int64_t N, int64_t K, int num_threads) {
    QActs acts;
    if (!fuselm_qacts_prepare_tiles(&acts, x, K, M, K, bits, num_threads)) return; /* not on a build that has tiles */
    const int64_t items = (N + R16_CHUNK_ROWS - 1) / R16_CHUNK_ROWS;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t item = 0; item < items; item++) {
        const int64_t n0 = item * R16_CHUNK_ROWS, n1 = n0 + R16_CHUNK_ROWS < N ? n0 + R16_CHUNK_ROWS : N;
        fuselm_rows16(&acts, 0, M, tiles, bits, scale_dtype, n0, n1, y, ldy);
        if (bias != NULL)
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = n0; n < n1; n++) y[m * ldy + n] += bias[n];
    }
    fuselm_qacts_release(&acts);
}

void fuselm_rows16_expert(const QPart *w, int64_t e, const QActs *a, int64_t m0, int64_t rows, int64_t n0, int64_t n1,
                          float *y, int64_t ldy) {
    const int64_t bytes = w->bits == 8 ? fuselm_int8_rows16_bytes(w->n, w->k, w->scale_dtype)
                                       : fuselm_int4_rows16_bytes(w->n, w->k, w->scale_dtype);
    fuselm_rows16(a, m0, rows, (const char *)w->qweight + e * bytes, w->bits, w->scale_dtype, n0, n1, y, ldy);
}
