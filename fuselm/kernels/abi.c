/* What the library says about itself, so that fuselm/kernels/cpu.py can check it before the first call:
 * the ABI version of fuselm_kernels.h it was compiled from, the cache key and ISA variant
 * fuselm/kernels/build.py compiled it for (passed in as -DFUSELM_BUILD_KEY / -DFUSELM_ISA), and a table
 * of the layout of every structure field and the value of every code that fuselm/kernels/abi.py
 * mirrors. A Python structure that disagrees with this table is an error at load instead of memory
 * corruption inside decode_layers.c.
 */
#include <stddef.h>

#include "fuselm_kernels.h"

#ifndef FUSELM_BUILD_KEY
#define FUSELM_BUILD_KEY "unrecorded"
#endif
#ifndef FUSELM_ISA
#define FUSELM_ISA "unrecorded"
#endif

int fuselm_abi_version(void) { return FUSELM_ABI_VERSION; }

const char *fuselm_build_key(void) { return FUSELM_BUILD_KEY; }

const char *fuselm_isa(void) { return FUSELM_ISA; }

#define CODE(name) {#name, (int64_t)(name)}
#define SIZE(T) {"sizeof(" #T ")", (int64_t)sizeof(T)}
/* a field's offset and its size (sizeof does not evaluate the null pointer it is applied to) */
#define FIELD(T, f) \
    {"offsetof(" #T ", " #f ")", (int64_t)offsetof(T, f)}, {"sizeof(" #T "." #f ")", (int64_t)sizeof(((T *)0)->f)}

static const FuselmAbiEntry abi_table[] = {
    CODE(FUSELM_F32),
    CODE(FUSELM_BF16),
    CODE(FUSELM_F16),
    CODE(FUSELM_I8),
    CODE(FUSELM_MAX_PARTS),
    SIZE(QPart),
    FIELD(QPart, qweight),
    FIELD(QPart, scales),
    FIELD(QPart, mins),
    FIELD(QPart, n),
    FIELD(QPart, k),
    FIELD(QPart, group),
    FIELD(QPart, bits),
    FIELD(QPart, scale_dtype),
    SIZE(QProj),
    FIELD(QProj, parts),
    FIELD(QProj, num_parts),
    FIELD(QProj, bias),
    SIZE(QLayer),
    FIELD(QLayer, qkv),
    FIELD(QLayer, o),
    FIELD(QLayer, gate_up),
    FIELD(QLayer, down),
    FIELD(QLayer, input_norm),
    FIELD(QLayer, post_norm),
    FIELD(QLayer, k_cache),
    FIELD(QLayer, v_cache),
    FIELD(QLayer, k_scale),
    FIELD(QLayer, v_scale),
    FIELD(QLayer, moe),
    FIELD(QLayer, q_norm),
    FIELD(QLayer, k_norm),
    FIELD(QLayer, qk_norm_whole),
    FIELD(QLayer, clip_qkv),
    SIZE(QMoe),
    FIELD(QMoe, router),
    FIELD(QMoe, gate),
    FIELD(QMoe, up),
    FIELD(QMoe, down),
    FIELD(QMoe, num_experts),
    FIELD(QMoe, top_k),
    FIELD(QMoe, renormalize),
    FIELD(QMoe, float_activations),
    FIELD(QMoe, routed_ids),
    FIELD(QMoe, shared_gate_up),
    FIELD(QMoe, shared_down),
    FIELD(QMoe, shared_gate),
    FIELD(QMoe, shared_intermediate),
    SIZE(QModelDims),
    FIELD(QModelDims, hidden),
    FIELD(QModelDims, num_heads),
    FIELD(QModelDims, num_kv_heads),
    FIELD(QModelDims, head_dim),
    FIELD(QModelDims, intermediate),
    FIELD(QModelDims, block_size),
    FIELD(QModelDims, max_blocks),
    FIELD(QModelDims, eps),
    FIELD(QModelDims, scale),
    FIELD(QModelDims, kv_dtype),
    FIELD(QModelDims, num_threads),
};

const FuselmAbiEntry *fuselm_abi_table(int64_t *count) {
    *count = (int64_t)(sizeof abi_table / sizeof abi_table[0]);
    return abi_table;
}
