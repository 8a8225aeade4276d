"""Dense int4 g32 projections in kernels/int4_rows16.c's sixteen-row tiles (QuantLinear on builds with
AVX512_VNNI or AVX2): against the float64 product of the dequantised weights at 1 to 600 rows (a row's result
independent of the others wherever the tile kernel runs: every row count with VNNI, below 256 rows on AVX2) (K a multiple of 128
and not, N a multiple of 16, float16 and float32 scales, a bias, q/k/v parts side by side), the C layer
step's fused projection (quant_project.c) against each tiled part alone, the tiles as the only copy of the
weight, the shapes and weights that keep the QuantWeight layout, and whole models (the embedded Q4_1 GGUF
and a tiny random Llama quantised at load) giving the greedy tokens and logprobs of the layout without
tiles (FUSELM_INT4_TILES=0)."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from fuselm import LLM, SamplingParams
from fuselm.kernels.abi import DTYPE_CODES, QPart, QProj
from fuselm.kernels.cpu import get_kernels
from fuselm.quant.formats import QuantWeight, quantize_int4, quantize_int8
from fuselm.quant import tiles
from fuselm.quant.int4_rows16 import Int4Rows16
from fuselm.quant.linear import QuantLinear

kernels = get_kernels()
pytestmark = pytest.mark.skipif(kernels is None or not kernels.int4_rows16_available,
                                reason="the int4 tile kernel needs an AVX2 or AVX512_VNNI build")


def _int4(n: int, k: int, scale_dtype: torch.dtype, g: torch.Generator) -> QuantWeight:
    q = quantize_int4(torch.randn(n, k, generator=g) * k ** -0.5, 32)
    return QuantWeight(4, 32, q.shape, q.qweight, q.scales.to(scale_dtype), q.mins.to(scale_dtype), q.source)


def _reference(parts: list[QuantWeight], bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    want = F.linear(x.double(), torch.cat([q.dequantize().double() for q in parts]))
    return want if bias is None else want + bias.double()


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # activations rounded to int16 per 32 values (quant_rows.c): ~1e-4 of the largest output
    return (got.double() - want).abs().max().item() < 5e-4 * want.abs().max().item() + 1e-6


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("k", [256, 576, 160])  # 576, 160: a shorter last quad of blocks in the split activations
def test_tiled_layer_matches_the_dequantised_reference(scale_dtype, k):
    g = torch.Generator().manual_seed(k)
    parts = [_int4(n, k, scale_dtype, g) for n in (128, 48, 48)]  # q, k, v
    bias = torch.randn(224, generator=g)
    layer, plain = QuantLinear(parts, bias), QuantLinear(parts, bias)
    layer.use_cpu_kernels(kernels)
    assert all(isinstance(p, Int4Rows16) for p in layer.parts) and layer.kind == "int4g32-c-tiles"
    assert [t.data_ptr() for t in layer.weight_tensors()[:-1]] == [p.tiles.data_ptr() for p in layer.parts]
    assert sum(p.nbytes for p in layer.parts) == sum(q.nbytes for q in parts)  # the same bytes, one copy
    x = torch.randn(600, k, generator=g)
    x[7] = 0.0  # a zero row: every block's activation scale is 0
    gemm_from = tiles.dequantized_gemm_rows(kernels)  # None with VNNI: the tiles take every row count
    for m in (1, 2, 3, 5, 16, 47, 48, 64, 127, 130, 255, 256, 600):  # few rows, and the rows that took the dequantised GEMM
        got = layer(x[:m])
        assert _close(got, _reference(parts, bias, x[:m])), m
        if gemm_from is None or m < gemm_from:  # in the tile kernel a row's result does not depend on the other rows
            assert torch.equal(got[:1], layer(x[:1])), m
    layer.kernels = None  # the portable path unpacks the tiles: exactly the reference's weights
    assert torch.equal(layer(x[:9]), plain(x[:9]))


def test_tiles_dequantize_to_the_same_weight():
    g = torch.Generator().manual_seed(1)
    for scale_dtype in (torch.float16, torch.float32):
        q = _int4(80, 320, scale_dtype, g)
        assert torch.equal(kernels.dequantize(Int4Rows16.pack(q)), q.dequantize())


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_rows_taken_from_the_tiles_are_the_weights_rows(scale_dtype):
    g = torch.Generator().manual_seed(5)
    q = _int4(48, 320, scale_dtype, g)
    tiles = Int4Rows16.pack(q)
    for ids in (torch.tensor([31]), torch.tensor([47, 0, 31, 31, 16, 15]), torch.randint(0, 48, (3, 4), generator=g)):
        got, want = tiles.take(ids), q.rows(ids.reshape(-1))
        assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)
        assert torch.equal(got.mins, want.mins) and got.shape == want.shape


def test_weights_that_keep_their_layout(monkeypatch):
    g = torch.Generator().manual_seed(2)
    kept = [_int4(40, 256, torch.float16, g),  # rows not a multiple of 16
            quantize_int4(torch.randn(32, 256, generator=g), 64),  # groups of 64
            quantize_int8(torch.randn(32, 256, generator=g), -1)]  # int8 per channel (int8 g32: test_int8_rows16.py)
    for q in kept:
        layer = QuantLinear([q])
        layer.use_cpu_kernels(kernels)
        assert layer.parts[0] is q
    monkeypatch.setenv("FUSELM_INT4_TILES", "0")
    forced = QuantLinear([_int4(32, 256, torch.float16, g)])
    forced.use_cpu_kernels(kernels)
    assert isinstance(forced.parts[0], QuantWeight) and forced.kind == "int4g32-c"


def _qpart(p) -> QPart:
    if isinstance(p, Int4Rows16):
        return QPart(p.tiles.data_ptr(), None, None, p.out_features, p.in_features, 32, 4, DTYPE_CODES[p.scale_dtype])
    return QPart(p.qweight.data_ptr(), p.scales.data_ptr(), None if p.mins is None else p.mins.data_ptr(),
                 p.out_features, p.in_features, p.group_size, p.bits, DTYPE_CODES[p.scales.dtype])


def _project(parts, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    proj = QProj()
    proj.num_parts = len(parts)
    for i, p in enumerate(parts):
        proj.parts[i] = _qpart(p)
    proj.bias = None if bias is None else bias.data_ptr()
    y = torch.full((x.shape[0], sum(p.out_features for p in parts)), float("nan"))
    kernels._lib.fuselm_project(ctypes.byref(proj), x.data_ptr(), y.data_ptr(), x.shape[0], torch.get_num_threads())
    return y


@pytest.mark.parametrize("k", [256, 192])
def test_fused_projection_over_tiles_equals_each_part_alone(k):
    """decode_layers.c's projection: tiled parts (and, at K % 128 == 0, tiled beside untiled int4 parts in one pass;
    otherwise the per-part path) give each part's fuselm_qlinear result, the same bits."""
    g = torch.Generator().manual_seed(k)
    weights = [_int4(n, k, torch.float16, g) for n in (96, 32, 32)]
    bias = torch.randn(160, generator=g)
    x = torch.randn(70, k, generator=g)
    want = _reference(weights, bias, x)
    for parts in ([Int4Rows16.pack(q) for q in weights], [Int4Rows16.pack(weights[0]), weights[1], weights[2]]):
        for m in (1, 4, 9, 70):
            got = _project(parts, bias, x[:m])
            cols = [0, 96, 128, 160]
            alone = torch.cat([kernels.qlinear(x[:m], p, bias[cols[i]:cols[i + 1]].contiguous())
                               for i, p in enumerate(parts)], dim=1)
            assert torch.equal(got, alone), m
            assert _close(got, want[:m]), m


LONG = [(7 * i) % 300 + 20 for i in range(150)]  # 150 tokens: prompt chunks of 128 rows and 22


def _greedy(monkeypatch, tiles: bool, path: str | None = None, **options):
    """(the plan's projection kinds, each prompt's greedy tokens and their logprobs)."""
    monkeypatch.setenv("FUSELM_INT4_TILES", "1" if tiles else "0")
    monkeypatch.setenv("FUSELM_INT8_TILES", "1" if tiles else "0")  # the embedded model's tied int8 LM head
    llm = LLM(path, dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=128, **options)
    plan = llm.engine.runner.plan
    assert plan.layers.startswith("c")  # the C layer step (decode_layers.c) reads the weights
    prompts = [[5, 9, 33, 2], [11] * 20, LONG]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return plan.linear, [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                                   o.outputs[0].token_ids)])
                         for o in outs]


def _same_run(a, b) -> None:
    for (ta, la), (tb, lb) in zip(a, b):
        assert ta == tb
        assert max(abs(x - y) for x, y in zip(la, lb)) < 5e-3  # rounded activations, float sums in another order


def test_embedded_model_with_tiles_matches_the_old_layout(monkeypatch):
    kinds, tiled = _greedy(monkeypatch, True)
    assert all("tiles" in kinds[role] for role in ("qkv", "o", "gate_up", "down", "lm_head"))
    kinds_plain, plain = _greedy(monkeypatch, False)
    assert not any("tiles" in kind for kind in kinds_plain.values())
    _same_run(tiled, plain)


def test_tiny_model_quantised_at_load_with_tiles_matches_the_old_layout(monkeypatch, tiny_llama):
    kinds, tiled = _greedy(monkeypatch, True, tiny_llama[0], quantization="int4")
    assert all("tiles" in kinds[role] for role in ("qkv", "o", "gate_up", "down"))
    _same_run(tiled, _greedy(monkeypatch, False, tiny_llama[0], quantization="int4")[1])
