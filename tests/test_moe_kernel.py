"""The grouped expert kernel (kernels/moe.c through GroupedExperts' C path) against the portable torch
path (GroupedExperts' reference: each expert's dequantised weight, F.linear, index_add) on random
shapes and routings, including experts that get no token and one expert that gets every token."""

from __future__ import annotations

import pytest
import torch

from fuselm.kernels.cpu import get_kernels
from fuselm.layers.moe import GroupedExperts, route
from fuselm.quant.formats import quantize_int4, quantize_int8

from moe_models import check_tokens_independent_of_batch

kernels = get_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="the C kernels cannot be built here")

FORMATS = {  # name -> how one expert's float weight [N, K] becomes what the C path reads
    "float32": None,
    "int4 g32 fp16 (Q4_0/Q4_1)": lambda w: quantize_int4(w, 32),
    "int4 g32 fp32 (Q4_K)": lambda w: _fp32_scales(quantize_int4(w, 32)),
    "int8 g32 (Q8_0)": lambda w: quantize_int8(w, 32),
    "int8 g16 fp32 (Q6_K)": lambda w: _fp32_scales(quantize_int8(w, 16)),
}


def _fp32_scales(q):
    q.scales = q.scales.float()
    q.mins = None if q.mins is None else q.mins.float()
    return q


def _stack(ws: torch.Tensor, fmt: str):
    """[E, N, K] float -> what GroupedExperts.load takes in this format."""
    make = FORMATS[fmt]
    if make is None:
        return ws
    from fuselm.quant.formats import stack_rows

    return stack_rows([make(w) for w in ws])


def _pair(num_experts: int, hidden: int, inter: int, fmt: str, seed: int):
    """(C-path experts, torch-path experts) over the same weights."""
    if fmt == "float32" and not kernels.has_simd_dense:
        pytest.skip("float experts run in C only with the AVX2 or AVX-512 dense kernel (FUSELM_CPU_ISA=generic)")
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(num_experts, n, k, generator=g) * k ** -0.5
               for n, k in ((inter, hidden), (inter, hidden), (hidden, inter))]
    fast, ref = GroupedExperts(num_experts, hidden, inter), GroupedExperts(num_experts, hidden, inter)
    fast.load(*[_stack(w, fmt) for w in weights])
    ref.load(*[_stack(w, fmt) for w in weights])
    assert fast.use_cpu_kernels(kernels, torch.float32) is None
    assert fast.kind.startswith("c-grouped") and ref.kind.startswith("torch-grouped")
    return fast, ref


def _tolerance(fmt: str, ref: torch.Tensor) -> float:
    # the quantised C path rounds activations to int16 per 32 values (quant_linear.c): ~1e-4 relative
    return (1e-5 if fmt == "float32" else 2e-3) * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("tokens,num_experts,top_k,hidden,inter", [
    (1, 8, 2, 64, 32), (7, 16, 4, 128, 96), (33, 32, 4, 96, 160), (130, 8, 8, 64, 64), (5, 64, 1, 256, 64),
])
def test_grouped_kernel_matches_torch(fmt, tokens, num_experts, top_k, hidden, inter):
    fast, ref = _pair(num_experts, hidden, inter, fmt, seed=tokens)
    g = torch.Generator().manual_seed(100 + tokens)
    x = torch.randn(tokens, hidden, generator=g)
    weights, ids = route(torch.randn(tokens, num_experts, generator=g), top_k, renormalize=False)
    want = ref(x, ids, weights)
    got = fast(x, ids, weights)
    assert (got - want).abs().max().item() < _tolerance(fmt, want)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_one_expert_gets_every_token_and_most_get_none(fmt):
    fast, ref = _pair(16, 64, 96, fmt, seed=3)
    tokens = 70
    x = torch.randn(tokens, 64)
    ids = torch.full((tokens, 2), 5, dtype=torch.long)
    ids[:, 1] = 11  # experts 5 and 11 take every token, the other 14 none
    weights = torch.rand(tokens, 2)
    want = ref(x, ids, weights)
    assert (fast(x, ids, weights) - want).abs().max().item() < _tolerance(fmt, want)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("fmt", ["float32", "int4 g32 fp32 (Q4_K)", "int8 g16 fp32 (Q6_K)"])
def test_a_tokens_result_does_not_depend_on_the_batch(fmt, threads):
    """Bit for bit: a token alone or two together, or among 40 others sharing their experts, get the same output
    (so greedy decoding does not change with how the scheduler packs a step). On 1-3 threads, so that the few-row
    paths run both ways: whole experts per thread where the routed experts divide evenly between the threads,
    items shared out otherwise."""
    fast, _ = _pair(8, 64, 64, fmt, seed=4)
    check_tokens_independent_of_batch(fast, 64, 8, 2, [[1, 3], [1, 2]], threads)


@pytest.mark.parametrize("fmt", ["float32", "int8 g32 (Q8_0)"])
def test_steps_of_growing_and_shrinking_size_reuse_the_scratch(fmt):
    """The grouped rows live in a scratch kept between steps (moe.c fuselm_moe_scratch): steps larger and smaller
    than the one before, each against the torch path, with the grouping's stale rows of a larger step still there."""
    fast, ref = _pair(16, 128, 96, fmt, seed=8)
    g = torch.Generator().manual_seed(9)
    for tokens in (40, 150, 23, 150, 64):
        x = torch.randn(tokens, 128, generator=g)
        weights, ids = route(torch.randn(tokens, 16, generator=g), 4, renormalize=False)
        want = ref(x, ids, weights)
        assert (fast(x, ids, weights) - want).abs().max().item() < _tolerance(fmt, want), tokens


def test_no_tokens():
    fast, _ = _pair(4, 64, 32, "float32", seed=5)
    out = fast(torch.empty(0, 64), torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2))
    assert out.shape == (0, 64)


def test_float_experts_with_every_row_count_from_0_to_13():
    """kernels/moe_float.c at batch-32 shapes: expert e gets e rows (0 for expert 0, 13 for the last), so
    every few-row case of dense_linear.c runs (1-6 rows in one pass, 7-12 in two, 13 in tiles), the panel
    widths of a real layer (64-column items, 1,024-deep panels); a token alone gets the same bits."""
    num_experts, hidden, inter, top_k = 14, 1024, 192, 7
    fast, ref = _pair(num_experts, hidden, inter, "float32", seed=6)
    slots = torch.cat([torch.full((e,), e) for e in range(num_experts)])  # 91 assignments, expert e has e
    tokens = slots.numel() // top_k  # 13 tokens of 7 distinct experts each
    ids = slots[torch.arange(slots.numel()).view(top_k, tokens).T.reshape(-1)].view(tokens, top_k)
    assert all(len(set(row.tolist())) == top_k for row in ids)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, hidden, generator=g)
    weights = torch.rand(tokens, top_k, generator=g)
    want = ref(x, ids, weights)
    got = fast(x, ids, weights)
    assert (got - want).abs().max().item() < _tolerance("float32", want)
    for t in (0, tokens - 1):
        assert torch.equal(fast(x[t:t + 1], ids[t:t + 1], weights[t:t + 1])[0], got[t])


def test_huge_page_buffer_holds_what_is_written():
    """kernels/huge_pages.py: a large float32 buffer starts on a 2 MB boundary (Linux), has the asked size,
    and keeps its values (it is a view into a larger allocation, which must stay alive)."""
    import sys

    from fuselm.kernels.huge_pages import HUGE_MIN_BYTES, HUGE_PAGE, empty_float32

    numel = HUGE_MIN_BYTES // 4 + 5  # just past the size that takes huge pages
    buf = empty_float32(numel)
    assert buf.dtype == torch.float32 and buf.numel() == numel and buf.is_contiguous()
    if sys.platform.startswith("linux"):
        assert buf.data_ptr() % HUGE_PAGE == 0
    values = torch.arange(numel, dtype=torch.float32)
    buf.copy_(values)
    assert torch.equal(buf, values)
    assert empty_float32(10).numel() == 10  # small buffers are ordinary tensors
