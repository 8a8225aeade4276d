"""Weight quantisation formats: round-trip error bounds, GGUF tensors kept bit for bit (against
gguf.quants.dequantize), and the C matmul and the portable path against F.linear on the
dequantised weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fuselm.kernels.cpu import get_kernels
from fuselm.quant.formats import QuantWeight, pack_nibbles, quantize_int4, quantize_int8
from fuselm.quant.gguf_quants import to_quant_weight
from fuselm.quant.linear import QuantLinear


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05 * torch.rand(n, 1, generator=g)  # rows of varied scale
    w[1, :] = 0.0  # an all-zero row
    w[2, 5] = 3.0  # an outlier
    return w


def test_nibble_layout():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (3, 32)
    # byte j of each 32-weight run: weight j in the low nibble, weight j + 16 in the high one
    assert int(packed[0, 0]) == int(q[0, 0]) | int(q[0, 16]) << 4
    assert int(packed[2, 17]) == int(q[2, 33]) | int(q[2, 49]) << 4
    w = QuantWeight(4, 32, (3, 64), packed, torch.ones(3, 2, dtype=torch.float16), torch.zeros(3, 2, dtype=torch.float16))
    assert torch.equal(w.unpacked(), q)


def test_int8_round_trip_error():
    w = _weights(64, 256)
    for group in (None, 32):
        q = quantize_int8(w, group)
        back = q.dequantize()
        step = q.scales.float().repeat_interleave(q.group_size, dim=1)
        assert ((back - w).abs() <= step / 2 + 1e-7).all()
        assert (back[1] == 0).all()
    assert quantize_int8(w).scales.shape == (64, 1)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_error(group):
    w = _weights(64, 256)
    q = quantize_int4(w, group)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (64, 128) and q.scales.dtype == torch.float16
    back = q.dequantize()
    groups = w.view(64, -1, group)
    span = (groups.amax(-1) - groups.amin(-1)).repeat_interleave(group, dim=1)
    step = q.scales.float().repeat_interleave(group, dim=1)
    # half a step, plus the float16 rounding of min and scale (a few 2^-11 of the group's span)
    assert ((back - w).abs() <= step / 2 + span * 2 ** -8 + 1e-6).all()
    assert (back[1] == 0).all()
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(w, 48)


def _gguf_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a ggml type with finite float16 scale fields."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    offsets = {"Q4_0": [0], "Q8_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}[qtype.name]
    for off in offsets:
        halves = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16)
        raw[:, off:off + 2] = halves.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_gguf_types_kept_exactly(name):
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType[name]
    data = _gguf_blocks(qtype, 8, 512, np.random.default_rng(1))
    kept = to_quant_weight(data, int(qtype), (8, 512))
    want = torch.from_numpy(dequantize(data, qtype))
    got = kept.dequantize()
    # bit for bit, except that Q4_0's zero level comes out as +0.0 where gguf may give -0.0
    assert torch.equal(got, want)
    assert kept.bits == (8 if name in ("Q8_0", "Q6_K") else 4)


def test_unsupported_gguf_type_is_not_kept():
    from gguf.constants import GGMLQuantizationType

    data = _gguf_blocks(GGMLQuantizationType.Q4_0, 2, 64, np.random.default_rng(0))
    assert to_quant_weight(data, int(GGMLQuantizationType.Q5_1), (2, 64)) is None


def test_embedded_gguf_loads_kept_tensors_exactly():
    """Every weight of the embedded Q4_1/Q8_0 file, kept quantised (q/k rows un-permuted on the
    quantised form), equals the dequantising loader's float32 tensor."""
    from fuselm.loader.defaults import default_model_path
    from fuselm.loader.gguf import load_gguf

    path = default_model_path()
    plain = load_gguf(path, torch.float32).weights
    kept = load_gguf(path, torch.float32, keep_quantized=True).weights
    assert plain.keys() == kept.keys()
    sources = set()
    for name, tensor in plain.items():
        value = kept[name]
        if isinstance(value, QuantWeight):
            sources.add(value.source)
            value = value.dequantize()
        assert torch.equal(value, tensor), name
    assert sources == {"gguf:Q4_1", "gguf:Q8_0"}


def _formats(k: int) -> list[QuantWeight]:
    w = _weights(80, k, seed=3)
    wide = quantize_int4(w, 32)
    wide = QuantWeight(4, 32, wide.shape, wide.qweight, wide.scales.float(), wide.mins.float())  # float32 scales
    return [quantize_int4(w, 32), quantize_int4(w, 64), quantize_int4(w, 128), wide,
            quantize_int8(w), quantize_int8(w, 16), quantize_int8(w, 32)]


@pytest.mark.skipif(get_kernels() is None, reason="needs a C compiler for fuselm's CPU kernels")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 33])
def test_c_kernel_matches_dequantised_linear(rows):
    kernels = get_kernels()
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 384, generator=g)
    x[:, 7] = 60.0  # an outlier channel, as SmolLM2's activations have
    for qw in _formats(384):
        want = F.linear(x.double(), qw.dequantize().double())
        exact = kernels.qlinear(x, qw, None, float_activations=True)  # float activations: float32 rounding only
        assert torch.allclose(exact.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), (qw.bits, qw.group_size)
        # default: activations rounded to int16 per 32 values (~2^-16 of each block's largest value)
        got = kernels.qlinear(x, qw, None)
        assert (got.double() - want).abs().max() < 5e-4 * want.abs().max(), (qw.bits, qw.group_size)


@pytest.mark.skipif(get_kernels() is None, reason="needs a C compiler for fuselm's CPU kernels")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_each_isa_variant_matches_dequantised_linear(isa):
    """The integer path of each variant (AVX2: two ymm vpmaddwd per 32 weights; AVX-512: one zmm)
    against float64, with int16 activations, at tile remainders and row counts past one tile."""
    from fuselm.kernels.build import VARIANTS, supported
    from fuselm.kernels.cpu import load_kernels

    if not supported(VARIANTS[isa]):
        pytest.skip(f"this CPU lacks {isa}")
    kernels = load_kernels(isa)
    assert kernels.has_simd_qlinear
    g = torch.Generator().manual_seed(11)
    x = torch.randn(13, 384, generator=g)
    x[:, 7] = 60.0
    for qw in [*_formats(384), quantize_int8(_weights(80, 384, seed=4), 16)]:
        want = F.linear(x.double(), qw.dequantize().double())
        for rows in (1, 3, 4, 13):
            got = kernels.qlinear(x[:rows], qw, None).double()
            assert (got - want[:rows]).abs().max() < 5e-4 * want.abs().max(), (isa, qw.bits, qw.group_size, rows)


@pytest.mark.parametrize("use_kernels", [False, True])
def test_quant_linear_parts_and_bias(use_kernels):
    """A fused projection of parts in different formats (like Q4_K_M's q/k in Q4_K and v in Q6_K),
    with a bias, through the C kernel and through the portable (CUDA / no compiler) path."""
    kernels = get_kernels() if use_kernels else None
    if use_kernels and kernels is None:
        pytest.skip("needs a C compiler for fuselm's CPU kernels")
    w = _weights(96, 128, seed=7)
    parts = [quantize_int4(w[:32], 32), quantize_int4(w[32:64], 32), quantize_int8(w[64:], 16)]
    bias = torch.randn(96)
    layer = QuantLinear(parts, bias)
    layer.use_cpu_kernels(kernels)
    assert len(layer.parts) == 2  # the two int4 parts are stacked into one matmul
    x = torch.randn(2, 3, 128)
    want = F.linear(x, torch.cat([p.dequantize() for p in parts]), bias)
    assert torch.allclose(layer(x), want, rtol=5e-4, atol=5e-4)
    rows = torch.randn(64, 128)  # a prompt chunk: the dequantised-GEMM path, or int4_rows16.c's tiles (rounded x)
    tol = 5e-4 if "tiles" in layer.kind else 1e-4
    assert torch.allclose(layer(rows), F.linear(rows, torch.cat([p.dequantize() for p in parts]), bias), rtol=tol, atol=tol)
    if not use_kernels:  # bfloat16 activations on the portable path
        got = layer(x.bfloat16())
        assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, rtol=3e-2, atol=3e-2)
