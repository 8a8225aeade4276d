"""LinearMethod: how one projection's weight is stored and multiplied.

Every projection of a model (q/k/v, o, gate/up, down, the LM head) is a LinearMethod module. The
model builds plain `TorchLinear`s (a float weight and `F.linear`: the portable path and the
reference); at load the execution plan (fuselm/runner/execution_plan.py) replaces each by the
method that stores and multiplies it best on this machine:

| method         | file                      | storage                                 | multiply            |
|----------------|---------------------------|-----------------------------------------|---------------------|
| `TorchLinear`  | layers/linear.py          | float [out, in]                         | F.linear            |
| `OneDNNLinear` | kernels/onednn.py         | oneDNN's blocked layout (fp32, bf16)    | oneDNN              |
| `DenseLinear`  | kernels/dense_linear.py   | fuselm's fp32 panel layout              | fuselm's C GEMM     |
| `QuantLinear`  | quant/linear.py           | int4/int8 groups (QuantWeight parts)    | C kernel, or dequantise per call |

A method knows its `kind` (the label the plan logs), `in_features`/`out_features`, its optional
bias and the tensors it holds (`weight_tensors`, for memory accounting). The output columns of a
fused projection stay in the order of the parts it was built from, so a method built from a slice
of the parts (whole heads, whole groups) is the same method over fewer columns: that is where
tensor parallelism and expert grouping slice weights before building methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod(nn.Module):
    """y = x @ W^T (+ bias) for x [..., in_features], with W stored however the subclass chooses."""

    kind = "?"  # short label for the execution plan
    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every tensor this method holds (weights, scales, packed copies, bias)."""
        tensors = [t for t in (getattr(self, "weight", None), self.bias) if t is not None]
        return tensors

    def extra_repr(self) -> str:
        return f"{self.kind}: in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class TorchLinear(LinearMethod):
    """A plain float weight multiplied by `F.linear`: what the model is built with, and the
    portable path everywhere (CUDA, `cpu_kernels=False`)."""

    kind = "torch"

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features))
        assert tuple(weight.shape) == (out_features, in_features)
        self.weight = weight
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @classmethod
    def sharing(cls, weight: torch.Tensor) -> "TorchLinear":
        """A method over an existing weight [out, in] (tied embeddings: the LM head is the embedding table)."""
        return cls(weight.shape[1], weight.shape[0], weight=weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
