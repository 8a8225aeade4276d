"""int4 g32 experts in kernels/int4_rows16.c's sixteen-row tiles (fuselm/quant/int4_rows16.py), and the
one-region decode path (kernels/moe_few_rows.c), against the torch reference on the dequantised weights:
the tiles unpack to the very QuantWeight they came from, the C path with tiles matches the reference on
random shapes and routings (1 to 40 tokens, experts with no token, one expert with every token), a token's
output is the same bits alone (the few-rows path) and in a batch (moe.c's general path), and the tiles are
the only copy of the weights."""

from __future__ import annotations

import pytest
import torch

from fuselm.kernels.cpu import get_kernels
from fuselm.layers.moe import GroupedExperts, route
from fuselm.quant.formats import QuantWeight, quantize_int4, stack_rows
from fuselm.quant.int4_rows16 import Int4Rows16, fits

from moe_models import check_tokens_independent_of_batch

kernels = get_kernels()
needs_tiles = pytest.mark.skipif(kernels is None or not kernels.int4_rows16_available,
                                 reason="the int4 tile kernel needs an AVX2 or AVX512_VNNI build")


def _experts(num_experts: int, n: int, k: int, scale_dtype: torch.dtype, g: torch.Generator) -> QuantWeight:
    q = stack_rows([quantize_int4(torch.randn(n, k, generator=g) * k ** -0.5, 32) for _ in range(num_experts)])
    return QuantWeight(4, 32, q.shape, q.qweight, q.scales.to(scale_dtype), q.mins.to(scale_dtype), q.source)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_tiles_unpack_to_the_same_weight(scale_dtype):
    q = _experts(3, 48, 256, scale_dtype, torch.Generator().manual_seed(0))
    assert fits(q, 48)
    tiles = Int4Rows16.pack(q)
    assert tiles.nbytes == q.nbytes  # the same bytes, reordered
    for start, stop in ((0, 144), (48, 96), (16, 32)):
        back = tiles.rows(start, stop)
        assert torch.equal(back.qweight, q.qweight[start:stop])
        assert torch.equal(back.scales, q.scales[start:stop]) and torch.equal(back.mins, q.mins[start:stop])


def test_shapes_the_tiles_do_not_take():
    g = torch.Generator().manual_seed(1)
    assert not fits(_experts(2, 40, 256, torch.float16, g), 40)  # rows per expert not a multiple of 16
    assert not fits(_experts(2, 32, 96, torch.float16, g), 32)  # K not a multiple of 128
    assert not fits(quantize_int4(torch.randn(32, 256, generator=g), 64), 32)  # groups of 64


def _pair(num_experts: int, hidden: int, inter: int, scale_dtype: torch.dtype, seed: int):
    """(C path on tiles, torch path) over the same int4 experts."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    weights = [_experts(num_experts, n, k, scale_dtype, g) for n, k in shapes]
    fast, ref = GroupedExperts(num_experts, hidden, inter), GroupedExperts(num_experts, hidden, inter)
    fast.load(*weights)
    ref.load(*weights)
    assert fast.use_cpu_kernels(kernels, torch.float32) is None
    assert all(isinstance(w.quant, Int4Rows16) for w in (fast.gate, fast.up, fast.down))
    assert fast.kind == "c-grouped-int4g32" and ref.kind == "torch-grouped-int4g32"
    return fast, ref


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # activations rounded to int16 per 32 values, as quant_rows.c: ~1e-4 relative
    return (got - want).abs().max().item() < 2e-3 * max(1.0, want.abs().max().item())


@needs_tiles
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tokens,num_experts,top_k,hidden,inter", [
    (1, 8, 2, 256, 128), (1, 32, 4, 512, 256), (2, 16, 4, 128, 128), (3, 8, 1, 384, 256), (9, 16, 4, 256, 128),
    (40, 8, 2, 128, 256),
])
def test_tiles_match_the_torch_reference(scale_dtype, tokens, num_experts, top_k, hidden, inter):
    fast, ref = _pair(num_experts, hidden, inter, scale_dtype, seed=tokens)
    g = torch.Generator().manual_seed(50 + tokens)
    x = torch.randn(tokens, hidden, generator=g)
    weights, ids = route(torch.randn(tokens, num_experts, generator=g), top_k, renormalize=True)
    want = ref(x, ids, weights)
    assert _close(fast(x, ids, weights), want)
    # the torch path of the tiled experts unpacks them: exactly the reference's weights
    assert torch.equal(fast._forward_torch(x, ids, weights), want)


@needs_tiles
@pytest.mark.parametrize("tokens", [1, 2, 70])
def test_one_expert_gets_every_token_and_most_get_none(tokens):
    fast, ref = _pair(16, 256, 128, torch.float16, seed=7)
    x = torch.randn(tokens, 256)
    ids = torch.full((tokens, 2), 5, dtype=torch.long)
    ids[:, 1] = 11  # experts 5 and 11 take every token, the other 14 none
    weights = torch.rand(tokens, 2)
    assert _close(fast(x, ids, weights), ref(x, ids, weights))


@needs_tiles
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_tokens_result_does_not_depend_on_the_batch(threads):
    """Bit for bit: a token alone or two together (moe_few_rows.c: whole experts per thread where the routed
    experts divide evenly between the threads, else items split across them) or among 40 others (moe.c's
    general path)."""
    fast, _ = _pair(8, 256, 128, torch.float16, seed=4)
    check_tokens_independent_of_batch(fast, 256, 8, 4, [[1, 3, 5, 7], [1, 2, 5, 6]], threads)


@needs_tiles
def test_the_tiles_are_the_only_copy():
    fast, ref = _pair(8, 256, 128, torch.float16, seed=5)
    assert sum(t.numel() * t.element_size() for t in fast.weight_tensors()) == \
        sum(t.numel() * t.element_size() for t in ref.weight_tensors())
    assert len(fast.weight_tensors()) == 3  # one tile tensor per projection
