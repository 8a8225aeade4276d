"""int8 g32 weights (GGUF Q8_0's layout) in kernels/int8_rows16.c's sixteen-row tiles (fuselm/quant/int8_rows16.py),
against the float64 product of the dequantised weights: the tiles unpack to
the very QuantWeight they came from (levels -128 and 127 included), a dense layer at 1 to 600 rows (K a multiple
of 128 and not, float16 and float32 scales, a bias, a zero row), the C layer step's fused projection against each
part alone, MoE experts on random routings (experts with no token, one expert with every token, a token alone
and in a batch), the shapes that keep the QuantWeight layout, and a whole model quantised to int8 at load giving
the greedy tokens of the layout without tiles (FUSELM_INT8_TILES=0)."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from fuselm import LLM, SamplingParams
from fuselm.kernels.abi import DTYPE_CODES, QPart, QProj
from fuselm.kernels.cpu import get_kernels
from fuselm.layers.moe import GroupedExperts, route
from fuselm.quant import tiles as tile_choice
from fuselm.quant.formats import QuantWeight, quantize_int8, stack_rows
from fuselm.quant.int8_rows16 import Int8Rows16, fits
from fuselm.quant.linear import QuantLinear

from moe_models import check_tokens_independent_of_batch

kernels = get_kernels()
pytestmark = pytest.mark.skipif(kernels is None or not kernels.int8_rows16_available,
                                reason="the tile kernels need a build with AVX512_VNNI or AVX2")


def _int8(n: int, k: int, scale_dtype: torch.dtype, g: torch.Generator) -> QuantWeight:
    q = quantize_int8(torch.randn(n, k, generator=g) * k ** -0.5, 32)
    return QuantWeight(8, 32, q.shape, q.qweight, q.scales.to(scale_dtype), None, q.source)


def _reference(parts: list[QuantWeight], bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    want = F.linear(x.double(), torch.cat([q.dequantize().double() for q in parts]))
    return want if bias is None else want + bias.double()


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # activations rounded to int16 per 32 values (quant_rows.c): ~1e-4 of the largest output
    return (got.double() - want).abs().max().item() < 5e-4 * want.abs().max().item() + 1e-6


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_tiles_unpack_to_the_same_weight(scale_dtype):
    g = torch.Generator().manual_seed(0)
    q = _int8(48, 160, scale_dtype, g)
    q.qweight[0, :4] = torch.tensor([-128, 127, -127, 0], dtype=torch.int8)  # GGUF Q8_0 may hold -128
    assert fits(q, 48)
    tiles = Int8Rows16.pack(q)
    assert tiles.nbytes == q.nbytes  # the same bytes, reordered
    for start, stop in ((0, 48), (16, 32), (32, 48)):
        back = tiles.rows(start, stop)
        assert torch.equal(back.qweight, q.qweight[start:stop]) and torch.equal(back.scales, q.scales[start:stop])
    assert torch.equal(kernels.dequantize(tiles), q.dequantize())
    x = torch.randn(3, 160, generator=g)
    assert _close(kernels.qlinear(x, tiles, None), _reference([q], None, x))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_rows_taken_from_the_tiles_are_the_weights_rows(scale_dtype):
    g = torch.Generator().manual_seed(5)
    q = _int8(64, 160, scale_dtype, g)
    q.qweight[17, :4] = torch.tensor([-128, 127, -127, 0], dtype=torch.int8)
    tiles = Int8Rows16.pack(q)
    for ids in (torch.tensor([17]), torch.tensor([63, 0, 17, 17, 40, 15, 16]), torch.randint(0, 64, (2, 5), generator=g)):
        got, want = tiles.take(ids), q.rows(ids.reshape(-1))
        assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)
        assert got.shape == want.shape and got.mins is None


def test_a_tied_lm_head_in_tiles_serves_the_embedding_too(monkeypatch):
    """A tied table goes into tiles with its LM head (one copy); the embedding then looks its rows up there and
    gives the rows it gave before, and the head multiplies as the dequantised reference does."""
    from fuselm.quant.linear import QuantEmbedding
    from fuselm.runner.execution_plan import weight_bytes

    g = torch.Generator().manual_seed(6)
    q = _int8(96, 576, torch.float16, g)
    ids = torch.tensor([3, 95, 3, 40, 0])
    want_rows = QuantEmbedding(q, torch.float32)(ids)
    model = torch.nn.Module()
    model.embed_tokens = QuantEmbedding(q, torch.float32)
    model.lm_head = QuantLinear([q], tied_embedding=model.embed_tokens)
    assert model.embed_tokens not in list(model.lm_head.modules())  # not registered under the head
    model.lm_head.use_cpu_kernels(kernels)
    assert isinstance(model.lm_head.parts[0], Int8Rows16) and model.lm_head.kind == "int8g32-c-tiles"
    assert model.embed_tokens.qweight is model.lm_head.parts[0]
    assert torch.equal(model.embed_tokens(ids), want_rows)
    assert weight_bytes(model) == q.nbytes  # counted once
    x = torch.randn(70, 576, generator=g)  # from 48 rows the row layout took the dequantised GEMM; the tiles never do
    assert _close(model.lm_head(x), _reference([q], None, x))
    monkeypatch.setenv("FUSELM_INT8_TILES", "0")
    kept = QuantLinear([q], tied_embedding=QuantEmbedding(q, torch.float32))
    kept.use_cpu_kernels(kernels)
    assert kept.parts[0] is q and kept.tied_embedding.qweight is q


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("k", [256, 576, 160])  # 576, 160: a shorter last quad of blocks in the split activations
def test_tiled_layer_matches_the_dequantised_reference(scale_dtype, k):
    g = torch.Generator().manual_seed(k)
    parts = [_int8(n, k, scale_dtype, g) for n in (128, 48, 48)]  # q, k, v
    bias = torch.randn(224, generator=g)
    layer, plain = QuantLinear(parts, bias), QuantLinear(parts, bias)
    layer.use_cpu_kernels(kernels)
    assert all(isinstance(p, Int8Rows16) for p in layer.parts) and layer.kind == "int8g32-c-tiles"
    assert [t.data_ptr() for t in layer.weight_tensors()[:-1]] == [p.tiles.data_ptr() for p in layer.parts]
    assert sum(p.nbytes for p in layer.parts) == sum(q.nbytes for q in parts)  # the same bytes, one copy
    x = torch.randn(600, k, generator=g)
    x[7] = 0.0  # a zero row: every block's activation scale is 0
    gemm_from = tile_choice.dequantized_gemm_rows(kernels)  # None with VNNI: the tiles take every row count
    for m in (1, 2, 3, 5, 16, 47, 48, 64, 130, 255, 256, 600):  # few rows, and the rows that took the dequantised GEMM
        got = layer(x[:m])
        assert _close(got, _reference(parts, bias, x[:m])), m
        if gemm_from is None or m < gemm_from:  # in the tile kernel a row's result does not depend on the other rows
            assert torch.equal(got[:1], layer(x[:1])), m
    layer.kernels = None  # the portable path unpacks the tiles: exactly the reference's weights
    assert torch.equal(layer(x[:9]), plain(x[:9]))


def test_weights_that_keep_their_layout(monkeypatch):
    g = torch.Generator().manual_seed(2)
    kept = [_int8(40, 256, torch.float16, g),  # rows not a multiple of 16
            quantize_int8(torch.randn(32, 256, generator=g), -1),  # one scale per output channel
            QuantWeight(8, 16, (32, 256), torch.randint(-32, 32, (32, 256), dtype=torch.int8, generator=g),
                        torch.rand(32, 16, generator=g), None, "gguf:Q6_K")]  # groups of 16 (Q6_K)
    for q in kept:
        layer = QuantLinear([q])
        layer.use_cpu_kernels(kernels)
        assert layer.parts[0] is q
    monkeypatch.setenv("FUSELM_INT8_TILES", "0")
    forced = QuantLinear([_int8(32, 256, torch.float16, g)])
    forced.use_cpu_kernels(kernels)
    assert isinstance(forced.parts[0], QuantWeight) and forced.kind == "int8g32-c"


def _qpart(p) -> QPart:
    if isinstance(p, Int8Rows16):
        return QPart(p.tiles.data_ptr(), None, None, p.out_features, p.in_features, 32, 8, DTYPE_CODES[p.scale_dtype])
    return QPart(p.qweight.data_ptr(), p.scales.data_ptr(), None, p.out_features, p.in_features, p.group_size, p.bits,
                 DTYPE_CODES[p.scales.dtype])


def _project(parts, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    proj = QProj()
    proj.num_parts = len(parts)
    for i, p in enumerate(parts):
        proj.parts[i] = _qpart(p)
    proj.bias = bias.data_ptr()
    y = torch.full((x.shape[0], sum(p.out_features for p in parts)), float("nan"))
    kernels._lib.fuselm_project(ctypes.byref(proj), x.data_ptr(), y.data_ptr(), x.shape[0], torch.get_num_threads())
    return y


@pytest.mark.parametrize("k", [256, 192])
def test_fused_projection_over_tiles_equals_each_part_alone(k):
    """decode_layers.c's projection (quant_project.c's one pass for tiled parts; the per-part path where tiled and
    untiled int8 parts meet) gives each part's fuselm_qlinear result, the same bits."""
    g = torch.Generator().manual_seed(k)
    weights = [_int8(n, k, torch.float16, g) for n in (96, 32, 32)]
    bias = torch.randn(160, generator=g)
    x = torch.randn(70, k, generator=g)
    want = _reference(weights, bias, x)
    for parts in ([Int8Rows16.pack(q) for q in weights], [Int8Rows16.pack(weights[0]), weights[1], weights[2]]):
        for m in (1, 4, 9, 70):
            got = _project(parts, bias, x[:m])
            cols = [0, 96, 128, 160]
            alone = torch.cat([kernels.qlinear(x[:m], p, bias[cols[i]:cols[i + 1]].contiguous())
                               for i, p in enumerate(parts)], dim=1)
            assert torch.equal(got, alone), m
            assert _close(got, want[:m]), m


def _experts(num_experts: int, n: int, k: int, g: torch.Generator) -> QuantWeight:
    return stack_rows([_int8(n, k, torch.float16, g) for _ in range(num_experts)])


def _moe_pair(num_experts: int, hidden: int, inter: int, seed: int):
    """(C path on tiles, torch path) over the same int8 experts."""
    g = torch.Generator().manual_seed(seed)
    weights = [_experts(num_experts, n, k, g) for n, k in ((inter, hidden), (inter, hidden), (hidden, inter))]
    fast, ref = GroupedExperts(num_experts, hidden, inter), GroupedExperts(num_experts, hidden, inter)
    fast.load(*weights)
    ref.load(*weights)
    assert fast.use_cpu_kernels(kernels, torch.float32) is None
    assert all(isinstance(w.quant, Int8Rows16) for w in (fast.gate, fast.up, fast.down))
    assert len(fast.weight_tensors()) == 3  # one tile tensor per projection: the only copy
    return fast, ref


def _moe_close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() < 2e-3 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("tokens,num_experts,top_k,hidden,inter", [
    (1, 8, 2, 256, 128), (1, 32, 4, 512, 256), (3, 8, 1, 160, 96), (9, 16, 4, 256, 128), (40, 8, 2, 128, 256),
])
def test_tiled_experts_match_the_torch_reference(tokens, num_experts, top_k, hidden, inter):
    fast, ref = _moe_pair(num_experts, hidden, inter, seed=tokens)
    g = torch.Generator().manual_seed(50 + tokens)
    x = torch.randn(tokens, hidden, generator=g)
    weights, ids = route(torch.randn(tokens, num_experts, generator=g), top_k, renormalize=True)
    want = ref(x, ids, weights)
    assert _moe_close(fast(x, ids, weights), want)
    assert torch.equal(fast._forward_torch(x, ids, weights), want)  # the torch path unpacks the very weights


@pytest.mark.parametrize("tokens", [1, 2, 70])
def test_one_expert_gets_every_token_and_most_get_none(tokens):
    fast, ref = _moe_pair(16, 256, 128, seed=7)
    x = torch.randn(tokens, 256)
    ids = torch.full((tokens, 2), 5, dtype=torch.long)
    ids[:, 1] = 11  # experts 5 and 11 take every token, the other 14 none
    weights = torch.rand(tokens, 2)
    assert _moe_close(fast(x, ids, weights), ref(x, ids, weights))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_tokens_expert_output_does_not_depend_on_the_batch(threads):
    """Bit for bit: a token alone or two together (moe_few_rows.c: whole experts per thread where the routed
    experts divide evenly between the threads, else items split across them) or among 40 others (moe.c's
    general path)."""
    fast, _ = _moe_pair(8, 256, 128, seed=4)
    check_tokens_independent_of_batch(fast, 256, 8, 4, [[1, 3, 5, 7], [1, 2, 5, 6]], threads)


LONG = [(7 * i) % 300 + 20 for i in range(150)]  # 150 tokens: prompt chunks of 128 rows and 22


def _greedy(monkeypatch, tiles: bool, path: str):
    monkeypatch.setenv("FUSELM_INT8_TILES", "1" if tiles else "0")
    llm = LLM(path, dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=128, quantization="int8")
    plan = llm.engine.runner.plan
    assert plan.layers.startswith("c")  # the C layer step (decode_layers.c) reads the weights
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in ([5, 9, 33, 2], [11] * 20, LONG)], params, use_tqdm=False)
    return plan.linear, [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                                   o.outputs[0].token_ids)])
                         for o in outs]


def test_tiny_model_quantised_at_load_with_tiles_matches_the_old_layout(monkeypatch, tiny_llama):
    kinds, tiled = _greedy(monkeypatch, True, tiny_llama[0])
    assert all("tiles" in kinds[role] for role in ("qkv", "o", "gate_up", "down"))
    kinds_plain, plain = _greedy(monkeypatch, False, tiny_llama[0])
    assert not any("tiles" in kind for kind in kinds_plain.values())
    for (ta, la), (tb, lb) in zip(tiled, plain):
        assert ta == tb
        assert max(abs(x - y) for x, y in zip(la, lb)) < 5e-3  # float sums over blocks in another order
