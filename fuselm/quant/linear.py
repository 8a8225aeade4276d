"""QuantLinear (the linear method for quantised weights) and QuantEmbedding: modules that compute with QuantWeights and never hold the
full-precision weight.

On CPU with fuselm's C kernels the matmul runs in fuselm/kernels/quant_linear.c (weights widened
32 at a time in registers); on builds with AVX512_VNNI the int4 and int8 g32 parts (on AVX2 builds the int4
ones) are repacked at load into sixteen-row tiles (kernels/int4_rows16.c, kernels/int8_rows16.c; fuselm/quant/tiles.py), which
replace them. Anywhere else (CUDA, no C compiler, FUSELM_CPU_KERNELS=0) the portable
path dequantises one layer's weight for the call and runs F.linear: correct everywhere, fast only
where the GEMM dominates (large batches on a GPU).

A fused projection (q/k/v, gate/up) whose parts come in different formats (GGUF Q4_K_M stores v in
Q6_K and q/k in Q4_K) keeps one QuantWeight per format run and concatenates the outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.layers.linear import LinearMethod
from fuselm.quant import tiles
from fuselm.quant.formats import QuantWeight, stack_rows
from fuselm.quant.tiles import TILED

# From this many rows on (prompt chunks), dequantising the layer into a scratch buffer and running a
# float GEMM beats the row-streaming kernel (2-core EPYC, int4 gate/up [3072 x 576]: 32 rows 3.1 vs
# 3.3 ms, 64 rows 6.5 vs 3.6 ms, 256 rows 24 vs 14 ms; down [576 x 1536]: 64 rows 3.1 vs 2.6 ms).
# Weights in tiles (fuselm/quant/tiles.py) take it from tiles.dequantized_gemm_rows(kernels) on: never with
# VNNI (its int4 g32 tiles beat the dequantised GEMM 1.4-3.3x at 48-512 rows: benchmarks/tiles_layer.py,
# docs/performance.md), with the AVX2 tile kernel from tiles.DEQUANTIZED_GEMM_ROWS["avx2"] rows.
DEQUANTIZED_GEMM_ROWS = 48


def group_by_format(parts: list[QuantWeight]) -> list[QuantWeight]:
    """Stack consecutive parts of one format, keeping output order."""
    runs: list[list[QuantWeight]] = []
    for p in parts:
        if runs and runs[-1][0].format_key() == p.format_key():
            runs[-1].append(p)
        else:
            runs.append([p])
    return [run[0] if len(run) == 1 else stack_rows(run) for run in runs]


def stored_tensors(q) -> list[torch.Tensor]:
    """The tensors that hold a quantised weight: its tiles, or its levels, scales and mins."""
    return [q.tiles] if isinstance(q, TILED) else [t for t in (q.qweight, q.scales, q.mins) if t is not None]


class QuantLinear(LinearMethod):
    """A projection stored as QuantWeight parts (int4/int8 groups), multiplied by fuselm's C kernel on
    CPU (from DEQUANTIZED_GEMM_ROWS rows on: a float GEMM over a dequantised scratch copy) or by
    dequantising per call elsewhere."""

    def __init__(self, parts: list[QuantWeight], bias: torch.Tensor | None = None,
                 tied_embedding: QuantEmbedding | None = None) -> None:
        """tied_embedding: the embedding table that reads the same (one) weight; it follows the weight into tiles."""
        super().__init__()
        if not parts or any(p.in_features != parts[0].in_features for p in parts):
            raise ValueError("QuantLinear needs one or more weights with the same in_features")
        self.parts = group_by_format(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        # a plain tensor, not a Parameter: the module is built before the model's parameters are
        # allocated (Module.to_empty would otherwise wipe it)
        self.bias = bias
        self.kernels = None  # fuselm.kernels.cpu.CpuKernels, set by use_cpu_kernels()
        # the model's own embedding module, not a submodule of the LM head
        object.__setattr__(self, "tied_embedding", tied_embedding)
        self.gemm_rows = self._gemm_rows(None)

    @property
    def kind(self) -> str:
        formats = "+".join(dict.fromkeys(f"int{p.bits}g{p.group_size}" for p in self.parts))
        tiled = "-tiles" if any(isinstance(p, TILED) for p in self.parts) else ""
        return f"{formats}-{'c' if self.kernels is not None else 'dequant'}{tiled}"

    def weight_tensors(self) -> list[torch.Tensor]:
        tensors = [t for p in self.parts for t in stored_tensors(p)]
        return tensors + ([self.bias] if self.bias is not None else [])

    def use_cpu_kernels(self, kernels) -> None:
        """Multiply with `kernels` (None: the portable path). Where the build has sixteen-row tiles (int4 and int8 g32
        with AVX512_VNNI, int4 g32 on AVX2) the parts are repacked into them (fuselm/quant/tiles.py), which replace
        them (one copy of the weight). A tied embedding table then looks its rows up in the tiles: the embedded SmolLM2's
        tied int8 LM head in tiles against quant_rows.c's rows (from 48 rows the dequantised GEMM) at 1 / 4 / 16 / 64 /
        128 rows, 2 threads, a 2-vCPU Zen 4 EPYC: 1.1x / 1.9x / 2.7x / 4.2x / 3.7x (docs/performance.md)."""
        on_cpu = all(p.tiles.device.type == "cpu" if isinstance(p, TILED) else p.qweight.device.type == "cpu"
                     for p in self.parts)
        self.kernels = kernels if kernels is not None and on_cpu else None
        if self.kernels is not None:
            self.parts = [tiles.repack(p, kernels, p.out_features, dense=True) for p in self.parts]
            if self.tied_embedding is not None:
                self.tied_embedding.qweight = self.parts[0]
        self.gemm_rows = self._gemm_rows(kernels)

    def _gemm_rows(self, kernels) -> list[int | None]:
        """Per part, the rows from which it takes the dequantised GEMM on the C path (None: never)."""
        return [tiles.dequantized_gemm_rows(kernels) if isinstance(p, TILED) else DEQUANTIZED_GEMM_ROWS
                for p in self.parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernels is not None and x2.device.type == "cpu":
            xf = x2.float()
            rows = xf.shape[0]
            outs = [F.linear(xf, self.kernels.dequantize(p)) if gemm_from is not None and rows >= gemm_from
                    else self.kernels.qlinear(xf, p, None) for p, gemm_from in zip(self.parts, self.gemm_rows)]
            y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(x.dtype)
        else:
            outs = [F.linear(x2, p.dequantize(x.dtype)) for p in self.parts]
            y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)


class QuantEmbedding(nn.Module):
    """Token embeddings from a QuantWeight [vocab, hidden]: only the looked-up rows are dequantised.
    With tied embeddings the same weight is the LM head (a QuantLinear over it), also once that has put it in
    sixteen-row tiles (fuselm/quant/tiles.py)."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.qweight = weight
        self.dtype = dtype

    def weight_tensors(self) -> list[torch.Tensor]:
        return stored_tensors(self.qweight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        q = self.qweight
        return (q.take(input_ids) if isinstance(q, TILED) else q.rows(input_ids)).dequantize(self.dtype)
