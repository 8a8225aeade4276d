"""RMSNorm with HF's rounding, one C pass per row when the execution plan hands it the CPU kernels;
Gemma's variant (scale by 1 + weight, all in float32)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.cpu_kernels = None  # fuselm.kernels.cpu.CpuKernels: one C pass per row (3-10x faster, measured)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernels is not None and x.dim() == 2 and x.dtype == self.weight.dtype:
            return self.cpu_kernels.rms_norm(x, self.weight, self.eps)
        # Like HF: normalise in float32, then scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), computed in float32 and rounded once at the end
    (Llama rounds before scaling). The weight is stored as the offset from 1, as HF stores it."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)
