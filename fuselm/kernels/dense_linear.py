"""DenseLinear: the linear method for a float32 weight on fuselm's panel-packed weight (dense_linear.c), on CPU.

On an AVX2-only CPU torch's fp32 `F.linear` is slow from two rows on, and oneDNN's prepacked
weights (onednn.py) are opaque to fuselm's own C code, so the C decode step (decode_layers.c)
could not run a float model. fuselm's packed layout (panels of 16 output columns, k-major) is
read by a 6 x 16 AVX2 micro-kernel (12 x 32 with AVX-512, 2.0-2.4x faster from 8 rows on an AVX-512
EPYC; dense_linear.c) that matches oneDNN's packed fp32 GEMM from 64 to 512 rows and
beats it at decode sizes (measured on a 2-core AMD EPYC, SmolLM2-135M shapes, us):

| shape [N x K]     | 1 row        | 4 rows      | 16 rows     | 64 rows       | 512 rows        |
|-------------------|--------------|-------------|-------------|---------------|-----------------|
| qkv 960 x 576     | 52 vs 107    | 70 vs 124   | 165 vs 248  | 530 vs 651    | 4,350 vs 5,044  |
| gate/up 3072x576  | 102 vs 174   | 188 vs 262  | 532 vs 565  | 1,891 vs 1,862| 13,870 vs 13,891|
| down 576 x 1536   | 60 vs 121    | 104 vs 165  | 230 vs 339  | 823 vs 1,041  | 6,879 vs 7,175  |
| LM head 49152x576 | 5,446 vs 6,356 | 6,980 vs 8,523 | 14,117 vs 14,464 | 34,363 vs 32,779 | 282,374 vs 285,783 |

(fuselm vs oneDNN-packed, /tmp microbenchmark, weights warm in L3 except the LM head.) The packed
copy is the only copy of the weight: the layer keeps no plain Parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from fuselm.layers.linear import LinearMethod


def dense_kernels(kernels, weight: torch.Tensor):
    """`kernels` (fuselm.kernels.cpu.CpuKernels) when its AVX2 fp32 GEMM applies to this weight, else None."""
    if (kernels is None or not getattr(kernels, "has_simd_dense", False) or weight.dtype != torch.float32
            or weight.device.type != "cpu" or weight.dim() != 2):
        return None
    return kernels


class DenseLinear(LinearMethod):
    """y = x @ W^T (+ bias) for float32 x [..., in] through fuselm's packed copy of W."""

    kind = "fuselm-fp32-gemm"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.kernels = kernels
        self.packed = kernels.dense_pack(weight.detach())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)

    def weight_tensors(self) -> list[torch.Tensor]:
        return [*super().weight_tensors(), self.packed]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernels.dense_linear(x.reshape(-1, self.in_features), self.packed, self.bias, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)
