"""OneDNNLinear: the linear method over oneDNN-prepacked weights, for CPU.

`F.linear` on CPU hands oneDNN a plain row-major weight, which oneDNN reorders into its blocked
(VNNI/AMX) layout on every call. For bf16 that reorder is a pass over the whole weight per matmul,
which at decode batch sizes (tens of rows) costs as much as the matmul itself. Packing each weight
once at load time removes it: measured on a 2-core Sapphire Rapids (AMX), SmolLM2-135M shapes at
64 rows, bf16: qkv 82 -> 65 us, gate/up 243 -> 171 us, down 126 -> 71 us, o 56 -> 35 us, LM head
3.8 -> 2.0 ms. With many rows (a 512-token prompt chunk) packed is no faster and sometimes slower
for the narrow projections, so rows above `PACKED_MAX_ROWS` take the plain path.

fp32 is packed too. On Sapphire Rapids it gained only on the LM head, but on an AVX2-only AMD EPYC
(2 cores) packed fp32 is 1.2-3.9x faster than F.linear from 4 to 512 rows and level at 1 row:
gate/up [3072 x 576] at 4 rows 1500 -> 387 us, 16 rows 2455 -> 748 us, 64 rows 4891 -> 3528 us;
down [576 x 1536] at 4 rows 421 -> 214 us. A step verifying speculative tokens (5 rows per
request) would otherwise cost twice a plain decode there. fp32 keeps the packed path up to
every row count (measured level or better up to 512), so a packed fp32 layer drops its plain
weight: one copy in memory, not two.

In bf16 the plain weight stays the module's Parameter (for the large-M path and fuselm's
single-row C linear), so a packed bf16 layer costs one extra copy of its weight in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuselm.layers.linear import LinearMethod

PACKED_MAX_ROWS = 256  # bf16: above this many rows F.linear is as fast (measured, see the docstring)
SMALL_M_ROWS = 1  # rows that take fuselm's C linear: at 1 row 16.2 vs 13.4 GB/s, at 4 rows slower than oneDNN
_BATCH_HINT = 64  # rows oneDNN tunes the packed layout for: the typical decode batch


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN-packed copy of a [out, in] CPU weight, or None when this build cannot pack it
    (checked on a probe matmul against F.linear)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or not onednn_available():
        return None
    w = weight.detach().contiguous()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _BATCH_HINT)
        probe = torch.linspace(-1, 1, 3 * w.shape[1], dtype=w.dtype).view(3, -1)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return None
    want = F.linear(probe, w)
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    if not torch.allclose(got.float(), want.float(), atol=tol * max(1.0, want.abs().max().item()), rtol=tol):
        return None
    return packed


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [M, in] -> [M, out] through a weight from pack_weight()."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class OneDNNLinear(LinearMethod):
    """A weight in oneDNN's packed layout: in fp32 always (the plain weight is dropped), in bf16 for
    up to PACKED_MAX_ROWS rows and F.linear over the kept plain weight above that (and fuselm's C
    linear for a single row where `small_m` is given). `large_m_plain=False` keeps a bf16 layer on
    the packed weight at every row count (the LM head)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, small_m=None,
                 large_m_plain: bool = True) -> None:
        super().__init__()
        self.keep_plain = large_m_plain and weight.dtype != torch.float32
        self.weight = weight if self.keep_plain else None
        self.bias = bias
        self.packed = packed
        self.out_features, self.in_features = weight.shape
        self.small_m = small_m  # fuselm.kernels.cpu.CpuKernels for a few rows (see small_m_kernels), or None
        self.kind = "onednn" + ("+c1row" if small_m is not None else "")

    def weight_tensors(self) -> list[torch.Tensor]:
        return [*super().weight_tensors(), self.packed]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.keep_plain:
            return packed_linear(x.reshape(-1, self.in_features), self.packed, self.bias).view(*x.shape[:-1], -1)
        if x.dim() == 2:
            if self.small_m is not None and x.shape[0] <= SMALL_M_ROWS:
                return self.small_m.linear_small_m(x, self.weight, self.bias)
            if x.shape[0] <= PACKED_MAX_ROWS:
                return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


def small_m_kernels(weight: torch.Tensor, kernels):
    """`kernels` (fuselm.kernels.cpu.CpuKernels) when fuselm's C linear for a few rows applies to this weight
    (bf16, in_features % 32 == 0, a CPU with AVX-512 BF16): at one row it streams the weights at 16 GB/s
    where oneDNN reaches 13 (layer_ops.c)."""
    if (kernels is None or not kernels.has_small_m_linear or weight.dtype != torch.bfloat16
            or weight.shape[1] % 32 or not weight.is_contiguous()):
        return None
    return kernels
