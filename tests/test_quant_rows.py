"""kernels/quant_rows.c (through fuselm_qlinear, which takes it in the AVX-512 variants) against the
float64 product of the dequantised weight, on the shapes its block layouts treat apart: an odd
number of 32-blocks (a last int4 block outside the pairs), a K that is a multiple of 128 but not of
512 (VNNI runs of 16 blocks cut short), K not a multiple of 128 (the int16 layout even with VNNI),
int4 groups of 32/64/128, int8 groups of 16 (two scales per block), of 48 (a group boundary inside a
block: the float path) and per channel, float16 and float32 scales, 1 to 6 rows (4-row tiles and the rest). Each variant the CPU supports runs (the
`kernels` fixture), so the AVX2, AVX-512 and AVX-512 + VNNI code paths are all checked here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fuselm.quant.formats import QuantWeight, quantize_int4, quantize_int8


def _fp32_scales(q: QuantWeight) -> QuantWeight:
    return QuantWeight(q.bits, q.group_size, q.shape, q.qweight, q.scales.float(),
                       None if q.mins is None else q.mins.float())


def _group(w: torch.Tensor, wanted: int) -> int:
    return wanted if w.shape[1] % wanted == 0 else 32


FORMATS = {
    "int4 g32": lambda w: quantize_int4(w, 32),
    "int4 g64 fp32": lambda w: _fp32_scales(quantize_int4(w, _group(w, 64))),
    "int4 g128": lambda w: quantize_int4(w, _group(w, 128)),
    "int8 g16 fp32": lambda w: _fp32_scales(quantize_int8(w, 16)),
    "int8 g48": lambda w: quantize_int8(w, _group(w, 48)),  # a group boundary inside a 32-block
    "int8 g32": lambda w: quantize_int8(w, 32),
    "int8 per channel": lambda w: quantize_int8(w),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("k", [96, 192, 384, 640, 1152])
def test_rows_match_the_float64_product(kernels, fmt, k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(40, k, generator=g) * k ** -0.5
    x = torch.randn(6, k, generator=g)
    x[:, 7] *= 30.0  # an outlier channel: its blocks get a coarse activation scale
    qw = FORMATS[fmt](w)
    want = F.linear(x.double(), qw.dequantize().double())
    bias = torch.randn(40, generator=g)
    for rows in range(1, 7):
        got = kernels.qlinear(x[:rows], qw, None).double()
        assert (got - want[:rows]).abs().max() < 5e-4 * want.abs().max(), (fmt, k, rows)
    with_bias = kernels.qlinear(x, qw, bias).double()
    assert (with_bias - want - bias.double()).abs().max() < 5e-4 * want.abs().max()


@pytest.mark.parametrize("fmt", ["int4 g32", "int8 g16 fp32"])
def test_a_rows_result_does_not_depend_on_the_other_rows(kernels, fmt):
    """Bit for bit: a row alone or in a call of 1-6 rows (any position in the 4-row tiles)."""
    g = torch.Generator().manual_seed(1)
    qw = FORMATS[fmt](torch.randn(24, 512, generator=g) * 0.05)
    x = torch.randn(6, 512, generator=g)
    together = kernels.qlinear(x, qw, None)
    for r in range(6):
        assert torch.equal(kernels.qlinear(x[r:r + 1], qw, None)[0], together[r])
