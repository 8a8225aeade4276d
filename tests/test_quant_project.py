"""kernels/quant_project.c: a fused projection's quantised parts (q, k, v side by side) in one pass, as the C
layer step runs them (decode_layers.c `fuselm_project`), against each part through fuselm_qlinear (the
same bits: every output row is computed alike) and against the float64 product of the dequantised
weights. Mixed formats and float parts fall back to the per-part path, which must give the same result."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from fuselm.kernels.abi import DTYPE_CODES, QPart, QProj
from fuselm.quant.formats import QuantWeight, quantize_int4, quantize_int8


def _part(q: QuantWeight) -> QPart:
    return QPart(q.qweight.data_ptr(), q.scales.data_ptr(), None if q.mins is None else q.mins.data_ptr(),
                 q.shape[0], q.shape[1], q.group_size, q.bits, DTYPE_CODES[q.scales.dtype])


def _project(kernels, parts: list[QuantWeight], bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    proj = QProj()
    proj.num_parts = len(parts)
    for i, q in enumerate(parts):
        proj.parts[i] = _part(q)
    proj.bias = None if bias is None else bias.data_ptr()
    y = torch.full((x.shape[0], sum(q.shape[0] for q in parts)), float("nan"))
    kernels._lib.fuselm_project(ctypes.byref(proj), x.data_ptr(), y.data_ptr(), x.shape[0], torch.get_num_threads())
    return y


@pytest.mark.parametrize("quantize", [lambda w: quantize_int4(w, 32), lambda w: quantize_int8(w, 32),
                                      lambda w: quantize_int4(w, 64), lambda w: quantize_int8(w, 16)],
                         ids=["int4 g32", "int8 g32", "int4 g64", "int8 g16"])
@pytest.mark.parametrize("k", [256, 192])  # 192: not a multiple of 128, the int16 layout for int4
@pytest.mark.parametrize("with_bias", [False, True])
def test_parts_in_one_pass_equal_each_part_alone(kernels, quantize, k, with_bias):
    g = torch.Generator().manual_seed(k + with_bias)
    rows = (200, 40, 40)  # q wider than k and v, none a multiple of the work items' 64 rows
    parts = [quantize(torch.randn(n, k, generator=g) * k ** -0.5) for n in rows]
    bias = torch.randn(sum(rows), generator=g) if with_bias else None
    x = torch.randn(9, k, generator=g)
    x[3] = 0.0  # a zero row: every block's activation scale is 0
    want = F.linear(x.double(), torch.cat([q.dequantize().double() for q in parts]))
    if bias is not None:
        want += bias.double()
    for m in (1, 2, 4, 5, 9):
        got = _project(kernels, parts, bias, x[:m])
        alone = torch.cat([kernels.qlinear(x[:m], q, None if bias is None else bias[sum(rows[:i]):sum(rows[:i + 1])])
                           for i, q in enumerate(parts)], dim=1)
        assert torch.equal(got, alone), m
        assert (got.double() - want[:m]).abs().max() < 5e-4 * want.abs().max() + 1e-6, m


def test_mixed_formats_take_the_per_part_path(kernels):
    g = torch.Generator().manual_seed(3)
    parts = [quantize_int4(torch.randn(64, 128, generator=g), 32), quantize_int8(torch.randn(32, 128, generator=g), 32)]
    x = torch.randn(3, 128, generator=g)
    got = _project(kernels, parts, None, x)
    assert torch.equal(got, torch.cat([kernels.qlinear(x, q, None) for q in parts], dim=1))
