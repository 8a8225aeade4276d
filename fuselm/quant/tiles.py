"""Which quantised weights go into sixteen-row tiles (kernels/int4_rows16.c, kernels/int8_rows16.c), in one place.

On builds with AVX512_VNNI, int4 g32 and int8 g32 weights are repacked at load into tiles that one vpdpbusd
advances sixteen rows at a time (also on AVX2 builds: int4 with vpmaddubsw, int8 widened to int16 for vpmaddwd;
eight rows a register) (fuselm/quant/int4_rows16.py, fuselm/quant/int8_rows16.py). The MoE experts
(fuselm/layers/moe.py) and the dense projections (fuselm/quant/linear.py) ask `repack` for each weight, and
whatever hands weights to the C side tells a tiled one by `TILED` (the C side by its missing scales).

For comparisons, FUSELM_INT4_TILES and FUSELM_INT8_TILES (default 1): 0 keeps the QuantWeight layout and
quant_rows.c's kernels everywhere, `experts` tiles only the MoE experts.
"""

from __future__ import annotations

import os

from fuselm.quant import int4_rows16, int8_rows16
from fuselm.quant.formats import QuantWeight
from fuselm.quant.int4_rows16 import Int4Rows16
from fuselm.quant.int8_rows16 import Int8Rows16

TILED = (Int4Rows16, Int8Rows16)


def enabled(kernels, bits: int, dense: bool = False) -> bool:
    """Whether weights of `bits` that fit are repacked (`dense`: a dense projection's, else MoE experts')."""
    allowed = os.environ.get(f"FUSELM_INT{bits}_TILES", "1")
    return bool(getattr(kernels, f"int{bits}_rows16_available", False)) and allowed != "0" and not (
        dense and allowed == "experts")


# Rows from which a dense layer in tiles is dequantised and run as a float GEMM instead (fuselm/quant/linear.py), by
# the ISA variant of the tile kernel; absent: never. The AVX2 kernel (vpmaddubsw, eight rows a register) beats the
# row kernels at every row count but loses to the GEMM at prompt-chunk sizes: on a 2-vCPU Zen 3 EPYC (int4 g32,
# `benchmarks/tiles_layer.py --rows 128,192,256,384,512 --methods tiles,tiles-gemm`, one thread, CPU time) it is
# level with or faster than the GEMM up to 256 rows in SmolLM2's shapes (1.0-1.3x at 128) and faster at every count
# to 512 in the Mixtral-like attention shapes (1.2-2.2x); at 512 SmolLM2's o projection runs 1.34x slower in it.
DEQUANTIZED_GEMM_ROWS = {"avx2": 256}


def dequantized_gemm_rows(kernels) -> int | None:
    return DEQUANTIZED_GEMM_ROWS.get(getattr(kernels, "isa", None))


def repack(q, kernels, rows_per_expert: int, dense: bool = False):
    """q in tiles where this build and the environment allow it and the shape fits, else q unchanged. The K the
    activations are prepared for decides int4's fit: experts share them with quant_rows.c's rows (K % 128), a
    dense layer reads tails (K % 32)."""
    if not isinstance(q, QuantWeight) or not enabled(kernels, q.bits, dense):
        return q
    if q.bits == 4 and int4_rows16.fits(q, rows_per_expert, k_multiple=32 if dense else 128):
        return Int4Rows16.pack(q)
    if q.bits == 8 and int8_rows16.fits(q, rows_per_expert):
        return Int8Rows16.pack(q)
    return q
