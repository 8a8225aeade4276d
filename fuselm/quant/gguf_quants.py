"""GGUF quantised tensors -> QuantWeight, without dequantising and requantising.

Which ggml types map exactly (QuantWeight.dequantize() equals gguf.quants.dequantize bit for bit;
tests/test_quant_formats.py checks each):
- Q8_0 (blocks of 32 int8, a float16 scale)     -> int8, group 32, float16 scales
- Q4_0 (blocks of 32 nibbles, d; w = d (q - 8)) -> int4, group 32, scale d, min -8d (float16)
- Q4_1 (nibbles, d and m; w = d q + m)          -> int4, group 32, float16 scale and min
- Q4_K (256-blocks of eight 32-sub-blocks with 6-bit scales and mins under float16 d, dmin)
                                                  -> int4, group 32, float32 scale d*sc and min -dmin*m
- Q6_K (256-blocks of sixteen 16-sub-blocks, int8 scales under a float16 d; q in -32..31)
                                                  -> int8, group 16, float32 scale d*sc
Everything else (Q5_x, Q2_K, Q3_K, Q5_K, IQ*) returns None: the loader dequantises it and says so.
Q4_0/Q4_1 store their nibbles exactly in fuselm's int4 layout; Q4_K's are regrouped.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fuselm.quant.formats import QuantWeight, pack_nibbles

logger = logging.getLogger("fuselm")

# ggml type ids (gguf.GGMLQuantizationType) of the types above
Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 2, 3, 8, 12, 14
KEPT_TYPES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q6_K: "Q6_K"}
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34, Q4_K: 144, Q6_K: 210}


def _f16(col: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n] float16."""
    return np.ascontiguousarray(col).view(np.float16)[:, 0]


def to_quant_weight(data: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> QuantWeight | None:
    """data: the tensor's raw bytes as uint8 [rows, row_bytes]; shape: (out_features, in_features)."""
    if ggml_type not in KEPT_TYPES or len(shape) != 2:
        return None
    n, k = shape
    blocks = data.reshape(-1, _BLOCK_BYTES[ggml_type])  # [n * blocks_per_row, block bytes], row-major
    name = "gguf:" + KEPT_TYPES[ggml_type]
    t = torch.from_numpy
    if ggml_type == Q8_0:
        d = _f16(blocks[:, 0:2]).reshape(n, k // 32)
        q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).reshape(n, k)
        return QuantWeight(8, 32, (n, k), t(q.copy()), t(d.copy()), None, name)
    if ggml_type in (Q4_0, Q4_1):
        d = _f16(blocks[:, 0:2])
        if ggml_type == Q4_0:
            m, qs = (d * np.float16(-8)), blocks[:, 2:]
        else:
            m, qs = _f16(blocks[:, 2:4]), blocks[:, 4:]
        q = np.ascontiguousarray(qs).reshape(n, k // 2)  # byte j of a block: weight j low, j + 16 high
        return QuantWeight(4, 32, (n, k), t(q.copy()), t(d.reshape(n, k // 32).copy()),
                           t(m.reshape(n, k // 32).copy()), name)
    if ggml_type == Q4_K:
        from gguf.quants import Q4_K as GgufQ4K  # unpacks the 12 bytes of 6-bit scales and mins

        d = _f16(blocks[:, 0:2]).astype(np.float32)[:, None]
        dmin = _f16(blocks[:, 2:4]).astype(np.float32)[:, None]
        sc, mn = GgufQ4K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))  # [nb, 8] each
        scale = d * sc.astype(np.float32)
        mins = -(dmin * mn.astype(np.float32))
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)  # four 32-byte runs: low nibbles = sub-block 2i, high = 2i + 1
        levels = np.concatenate((qs & 0x0F, qs >> 4), axis=2).reshape(n, k)
        return QuantWeight(4, 32, (n, k), pack_nibbles(t(levels)), t(scale.reshape(n, k // 32)),
                           t(mins.reshape(n, k // 32)), name)
    # Q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, float16 d
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(blocks[:, 208:210]).astype(np.float32)[:, None]
    low = np.concatenate((ql.reshape(-1, 2, 1, 64) & 0x0F, ql.reshape(-1, 2, 1, 64) >> 4), axis=2).reshape(-1, 8, 32)
    high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = ((low | (high.reshape(-1, 8, 32) << 4)).astype(np.int16) - 32).astype(np.int8).reshape(n, k)
    return QuantWeight(8, 16, (n, k), t(q), t((d * sc).reshape(n, k // 16)), None, name)


def log_dequantised_types(types: dict[str, int], mapping: dict[str, str], weights: dict, float_types: set[int]) -> None:
    """One log line naming the quantised ggml types of `types` (GGUF name -> type) that were dequantised."""
    from gguf.constants import GGMLQuantizationType

    dequantised = sorted({GGMLQuantizationType(t).name for n, t in types.items()
                          if not isinstance(weights[mapping[n]], QuantWeight) and t not in float_types})
    if dequantised:
        logger.info("GGUF tensors of type %s have no exact fuselm format; dequantised to the model dtype",
                    ", ".join(dequantised))
