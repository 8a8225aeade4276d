"""Python's mirror of fuselm_kernels.h, the C kernel library's interface, kept in one place.

ctypes cannot read a C header, so the signatures, structures and codes the library exports are
written again here, once, and checked instead of trusted: when the library is loaded,
`check_version` and `check_layout` compare its own report (abi.c: its ABI version, the offset and
size of every structure field, the value of every code) with the definitions below, and
tests/test_kernel_build.py compares SIGNATURES with the header's declarations. Change this file
together with fuselm_kernels.h and its FUSELM_ABI_VERSION."""

from __future__ import annotations

import ctypes
import enum

import torch

ABI_VERSION = 13  # FUSELM_ABI_VERSION of the header this file mirrors


class DType(enum.IntEnum):
    """Element type codes (enum FuselmDtype): the dtype, kv_dtype and scale_dtype parameters."""

    F32 = 0
    BF16 = 1
    F16 = 2
    I8 = 3  # an int8 KV cache


DTYPE_CODES = {torch.float32: DType.F32, torch.bfloat16: DType.BF16, torch.float16: DType.F16, torch.int8: DType.I8}
MAX_PARTS = 3  # FUSELM_MAX_PARTS: weights side by side in one projection


class QPart(ctypes.Structure):
    _fields_ = [("qweight", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64),
                ("bits", ctypes.c_int32), ("scale_dtype", ctypes.c_int32)]


class QProj(ctypes.Structure):
    _fields_ = [("parts", QPart * MAX_PARTS), ("num_parts", ctypes.c_int64), ("bias", ctypes.c_void_p)]


class QMoe(ctypes.Structure):
    _fields_ = [("router", QProj), ("gate", QPart), ("up", QPart), ("down", QPart), ("num_experts", ctypes.c_int64),
                ("top_k", ctypes.c_int64), ("renormalize", ctypes.c_int32), ("float_activations", ctypes.c_int32),
                ("routed_ids", ctypes.c_void_p), ("shared_gate_up", ctypes.c_void_p), ("shared_down", ctypes.c_void_p),
                ("shared_gate", ctypes.c_void_p), ("shared_intermediate", ctypes.c_int64)]


class QLayer(ctypes.Structure):
    _fields_ = [("qkv", QProj), ("o", QProj), ("gate_up", QProj), ("down", QProj),
                ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p), ("moe", ctypes.POINTER(QMoe)),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("qk_norm_whole", ctypes.c_int32),
                ("clip_qkv", ctypes.c_float)]


class QModelDims(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int64), ("num_heads", ctypes.c_int64), ("num_kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64), ("block_size", ctypes.c_int64),
                ("max_blocks", ctypes.c_int64), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("kv_dtype", ctypes.c_int32), ("num_threads", ctypes.c_int32)]


class AbiEntry(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_int64)]


_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float

# name: (argument types, return type), in the header's order
SIGNATURES: dict[str, tuple[list, object]] = {
    "fuselm_abi_version": ([], _INT),
    "fuselm_build_key": ([], ctypes.c_char_p),
    "fuselm_isa": ([], ctypes.c_char_p),
    "fuselm_abi_table": ([ctypes.POINTER(ctypes.c_int64)], ctypes.POINTER(AbiEntry)),
    "fuselm_max_group": ([], _INT),
    "fuselm_max_dim": ([], _INT),
    "fuselm_max_block": ([], _INT),
    "fuselm_has_bf16_fast_path": ([], _INT),
    "fuselm_has_f32_avx512_attention": ([], _INT),
    "fuselm_paged_decode_attention": ([_P, _P, _P, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _F32,
                                       _INT, _INT, _INT], None),
    "fuselm_paged_window_attention": ([_P, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64,
                                       _F32, _INT, _INT, _INT], None),
    "fuselm_cascade_supported": ([_I64, _I64], _INT),
    "fuselm_cascade_attention": ([_P, _P, _P, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _INT,
                                  _INT, _INT, _P], None),
    "fuselm_cascade_attention_int8": ([_P, _P, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64,
                                       _I64, _F32, _INT, _INT, _P], None),
    "fuselm_chunk_attention_supported": ([_I64], _INT),
    "fuselm_chunk_attention": ([_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _F32, _INT, _INT, _INT],
                               None),
    "fuselm_store_kv_rows": ([_P, _P, _P, _P, _I64, _I64, _P, _P, _I64, _I64, _I64, _INT, _INT], None),
    "fuselm_paged_decode_attention_int8": ([_P, _P, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64,
                                            _I64, _I64, _F32, _INT, _INT], None),
    "fuselm_store_kv_rows_int8": ([_P, _P, _P, _P, _P, _P, _I64, _I64, _P, _P, _I64, _I64, _I64, _I64, _INT], None),
    "fuselm_small_m_max": ([], _INT),
    "fuselm_has_small_m_linear": ([], _INT),
    "fuselm_linear_bf16_small_m": ([_P, _P, _P, _P, _I64, _I64, _I64, _INT], None),
    "fuselm_rms_norm": ([_P, _P, _P, _I64, _I64, _F32, _INT, _INT], None),
    "fuselm_qlinear_has_simd": ([], _INT),
    "fuselm_qlinear_ld": ([_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _INT], None),
    "fuselm_qlinear": ([_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _INT], None),
    "fuselm_dequantize": ([_P, _P, _P, _P, _I64, _I64, _I64, _INT, _INT, _INT], None),
    "fuselm_qacts_prepare": ([_P, _P, _I64, _I64, _I64, _I64, _INT, _INT], _INT),
    "fuselm_qacts_release": ([_P], None),
    "fuselm_qacts_prepare_tiles": ([_P, _P, _I64, _I64, _I64, _INT, _INT], _INT),
    "fuselm_qacts_prepare_part": ([_P, _P, _P, _I64, _I64, _INT], _INT),
    "fuselm_qacts_fit": ([_P, _P], _INT),
    "fuselm_qrows": ([_P, _I64, _I64, _P, _P, _P, _INT, _I64, _I64, _P, _I64], None),
    "fuselm_dense_has_simd": ([], _INT),
    "fuselm_dense_set_tile_rows": ([_INT], None),
    "fuselm_dense_max_tile_rows": ([], _INT),
    "fuselm_dense_packed_size": ([_I64, _I64], _I64),
    "fuselm_dense_pack": ([_P, _P, _I64, _I64, _INT], None),
    "fuselm_dense_linear": ([_P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _INT], None),
    "fuselm_layer_attention_inputs": ([_P, _I64, _P, _P, _I64, _P, _P, _P, _P, _P], None),
    "fuselm_layer_attention_outputs": ([_P, _I64, _P, _P, _P, _I64], None),
    "fuselm_project": ([_P, _P, _P, _I64, _INT], None),
    "fuselm_qproject": ([_P, _P, _P, _I64, _INT], _INT),
    "fuselm_silu_mul": ([_P, _P, _I64, _I64, _INT], None),
    "fuselm_decode_layers": ([_P, _I64, _P, _P, _I64, _I64, _P, _P, _P, _P, _P], None),
    "fuselm_moe_experts": ([_P, _I64, _I64, _P, _P, _I64, _P, _P, _P, _P, _INT, _INT], None),
    "fuselm_moe_block": ([_P, _P, _P, _I64, _INT], None),
    "fuselm_int4_rows16_available": ([], _INT),
    "fuselm_int8_rows16_available": ([], _INT),
    "fuselm_qrows_read_split": ([_INT, _I64], _INT),
    "fuselm_int4_rows16_bytes": ([_I64, _I64, _INT], _I64),
    "fuselm_int4_rows16": ([_P, _I64, _I64, _P, _INT, _I64, _I64, _P, _I64], None),
    "fuselm_int4_rows16_dequantize": ([_P, _INT, _P, _I64, _I64, _INT], None),
    "fuselm_int8_rows16_bytes": ([_I64, _I64, _INT], _I64),
    "fuselm_int8_rows16": ([_P, _I64, _I64, _P, _INT, _I64, _I64, _P, _I64], None),
    "fuselm_int8_rows16_dequantize": ([_P, _INT, _P, _I64, _I64, _INT], None),
    "fuselm_rows16": ([_P, _I64, _I64, _P, _INT, _INT, _I64, _I64, _P, _I64], None),
    "fuselm_rows16_linear": ([_P, _P, _INT, _INT, _P, _P, _I64, _I64, _I64, _I64, _INT], None),
    "fuselm_rows16_expert": ([_P, _I64, _P, _I64, _I64, _I64, _I64, _P, _I64], None),
    "fuselm_moe_experts_few": ([_P, _I64, _I64, _P, _P, _I64, _P, _P, _P, _P, _INT, _INT], _INT),
    "fuselm_moe_float_experts": ([_P, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _P, _P, _INT], None),
    "fuselm_moe_scratch": ([_I64], _P),
}


class AbiVersionMismatch(RuntimeError):
    """The library was built from another version of fuselm_kernels.h: it is not used."""


class AbiLayoutMismatch(RuntimeError):
    """Same ABI version, different layout: this mirror is wrong, and calling the library would read or
    write the wrong memory."""


def check_version(lib: ctypes.CDLL) -> None:
    """Raise AbiVersionMismatch unless `lib` reports this file's ABI version."""
    try:
        version_fn = lib.fuselm_abi_version
    except AttributeError:
        raise AbiVersionMismatch("the library has no fuselm_abi_version (built before the ABI was versioned)") from None
    version_fn.argtypes, version_fn.restype = [], _INT
    version = version_fn()
    if version != ABI_VERSION:
        raise AbiVersionMismatch(f"library ABI version {version}, fuselm expects {ABI_VERSION}")


def bind(lib: ctypes.CDLL) -> None:
    """Give every exported function of `lib` its argument and return types."""
    for name, (argtypes, restype) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype


def expected_table() -> dict[str, int]:
    """What abi.c's table must say for the structures and codes above."""
    table = {f"FUSELM_{code.name}": int(code) for code in DType}
    table["FUSELM_MAX_PARTS"] = MAX_PARTS
    for struct in (QPart, QProj, QMoe, QLayer, QModelDims):
        name = struct.__name__
        table[f"sizeof({name})"] = ctypes.sizeof(struct)
        for field, _ in struct._fields_:
            table[f"offsetof({name}, {field})"] = getattr(struct, field).offset
            table[f"sizeof({name}.{field})"] = getattr(struct, field).size
    return table


def library_table(lib: ctypes.CDLL) -> dict[str, int]:
    """abi.c's table of `lib` (bound) as {entry name: value}."""
    count = ctypes.c_int64()
    entries = lib.fuselm_abi_table(ctypes.byref(count))
    return {entries[i].name.decode(): entries[i].value for i in range(count.value)}


def check_layout(lib: ctypes.CDLL) -> None:
    """Raise AbiLayoutMismatch unless `lib` (bound) lays out every structure and code as this file does."""
    got, want = library_table(lib), expected_table()
    wrong = sorted(name for name in got.keys() | want.keys() if got.get(name) != want.get(name))
    if wrong:
        detail = ", ".join(f"{name}: C {got.get(name)}, Python {want.get(name)}" for name in wrong[:8])
        raise AbiLayoutMismatch(f"fuselm/kernels/abi.py disagrees with the library on {len(wrong)} entries ({detail})")
