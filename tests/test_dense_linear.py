"""fuselm's fp32 panel-packed GEMM (fuselm/kernels/dense_linear.c) against a float64 reference, the
DenseLinear module against nn.Linear, and float32 engines using it (packed layers, packed LM head,
the fused C decode step) against the portable torch path on the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.kernels.cpu import get_kernels
from fuselm.kernels.dense_linear import DenseLinear
from fuselm.layers.linear import TorchLinear
from fuselm.runner.execution_plan import choose_linear

kernels = get_kernels()
pytestmark = pytest.mark.skipif(kernels is None or not kernels.has_simd_dense,
                                reason="needs the C kernels on an AVX2+FMA CPU; elsewhere oneDNN packing is used")


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 64, 131])
@pytest.mark.parametrize("n, k", [(1, 1), (17, 3), (80, 96), (130, 257), (33, 600), (40, 1537)])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_linear_matches_float64(m, n, k, bias):
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    wide = torch.randn(m, k + 5, generator=g)
    x = wide[:, 2:2 + k]  # rows with a stride larger than k
    packed = kernels.dense_pack(w)
    got = kernels.dense_linear(x, packed, b, n).double()
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    scale = (x.double().abs() @ w.double().abs().T).max().item() + 1
    assert (got - want).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("k, stride", [(1024, 1024), (2048, 2048), (1000, 1024), (3, 3072)])
@pytest.mark.parametrize("m", [13, 25, 64, 131])
def test_rows_at_a_4k_stride_match_float64_and_the_other_strides_bits(k, stride, m):
    """Rows whose stride is a multiple of 4 KB (hidden sizes 1,024, 2,048, ...) crowd one L1 set, so from a tile
    of rows on the kernel takes them in tiles of fewer rows: the same sums, so the same bits as rows at a stride
    that does not crowd (and as each row alone), and float64's values."""
    g = torch.Generator().manual_seed(k + m)
    n = 70
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    packed = kernels.dense_pack(w)
    x = torch.randn(m, stride, generator=g)[:, :k]
    got = kernels.dense_linear(x, packed, b, n)
    want = x.double() @ w.double().T + b.double()
    scale = (x.double().abs() @ w.double().abs().T).max().item() + 1
    assert (got.double() - want).abs().max().item() <= 1e-5 * scale
    other = torch.zeros(m, k + 7)
    other[:, :k] = x
    assert torch.equal(got, kernels.dense_linear(other[:, :k], packed, b, n))
    assert torch.equal(got[:7], torch.cat([kernels.dense_linear(x[i:i + 1], packed, b, n) for i in range(7)]))


@pytest.mark.parametrize("n, k", [(17, 3), (130, 257), (576, 1536), (33, 600), (1000, 520), (70, 1537)])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_linear_row_results_do_not_depend_on_the_row_count(n, k, bias):
    """Bit-for-bit: a row computed alone (the decode path) equals the same row inside 2..100 rows
    (a speculative verification, a prefill chunk), on any number of threads; otherwise greedy
    speculative decoding can flip a near-tie and stop being identical to plain decoding."""
    g = torch.Generator().manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(129, k, generator=g)
    packed = kernels.dense_pack(w)
    alone = torch.cat([kernels.dense_linear(x[i:i + 1], packed, b, n) for i in range(129)])
    # 2-128: the few-row passes (AVX-512; up to 6 rows with AVX2), over 6 rows in several passes; 129: the tiles
    for m in (2, 5, 6, 7, 8, 10, 12, 13, 19, 24, 64, 100, 128, 129):
        assert torch.equal(kernels.dense_linear(x[:m], packed, b, n), alone[:m]), m
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # nor on how the work is split between threads
    try:
        assert torch.equal(kernels.dense_linear(x, packed, b, n), alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bias", [False, True])
def test_plan_chooses_dense_linear_for_float32(bias):
    """The execution plan's linear choice puts a float32 projection on fuselm's GEMM: same results as
    F.linear, for 2-D and 3-D inputs; a bf16 one does not take it."""
    g = torch.Generator().manual_seed(5)
    plain = TorchLinear(40, 24, bias=bias)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(24, 40, generator=g))
        if bias:
            plain.bias.copy_(torch.randn(24, generator=g))
    x = torch.randn(9, 40, generator=g)
    want = plain(x)
    chosen = choose_linear(plain, kernels, onednn=False, role="qkv")
    assert isinstance(chosen, DenseLinear) and chosen.kind == "fuselm-fp32-gemm"
    got = chosen(x.view(3, 3, 40)).view(9, 24)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    bf16 = TorchLinear(40, 24).to(torch.bfloat16)
    assert choose_linear(bf16, kernels, onednn=False, role="qkv") is bf16


@pytest.mark.parametrize("name", ["llama_untied", "llama_tied", "qwen2_bias"])
def test_float32_engine_matches_portable_path(tiny_model_factory, name):
    """cpu_kernels=True packs every projection and the LM head for dense_linear.c and runs decode steps
    in one C call; cpu_kernels=False is the plain torch model: same greedy tokens, close logprobs."""
    path, _ = tiny_model_factory(name)
    prompts = random_prompts([3, 17, 60, 5], seed=11)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    fast = LLM(path, dtype="float32", device="cpu", cpu_kernels=True, max_num_batched_tokens=32)
    plain = LLM(path, dtype="float32", device="cpu", cpu_kernels=False)
    model = fast.engine.runner.model
    assert isinstance(model.lm_head, DenseLinear) and model.c_layers is not None
    assert isinstance(model.layers[0].mlp.gate_up_proj, DenseLinear)
    plan = fast.engine.runner.plan
    assert plan.layers == "c" and plan.linear == dict.fromkeys(["qkv", "o", "gate_up", "down", "lm_head"],
                                                               "fuselm-fp32-gemm")
    halves = []  # steps with prompt chunks (the budget of 32 splits the 60-token prompt) take the C halves
    inputs = model.c_layers.attention_inputs

    def counting(i, x, *args):
        halves.append(x.shape[0])
        return inputs(i, x, *args)

    model.c_layers.attention_inputs = counting
    for a, b in zip(fast.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb, tok in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(la[tok].logprob - lb[tok].logprob) < 1e-3
    assert len(halves) >= 2 * len(model.layers) and max(halves) == 32


@pytest.mark.parametrize("isa", ["avx512", "avx512bf16"])
def test_avx512_tiles_match_float64_and_the_avx2_bits(isa):
    """The AVX-512 variants' 12 x 32 zmm tiles against float64, and bit for bit against the AVX2
    variant's 6 x 16 tiles (each output is the same FMA chain in both), at row counts that take the
    few-row passes (<= 128 rows), partial tiles and the blocked path, odd panel counts included."""
    from fuselm.kernels.build import VARIANTS, supported
    from fuselm.kernels.cpu import load_kernels

    if not supported(VARIANTS[isa]):
        pytest.skip(f"this CPU lacks {isa}")
    wide, narrow = load_kernels(isa), load_kernels("avx2")
    assert wide.has_simd_dense and narrow.has_simd_dense
    for n, k in ((17, 3), (80, 96), (130, 257), (600, 40), (200, 300), (50, 1000)):
        g = torch.Generator().manual_seed(n + k)
        w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        packed = wide.dense_pack(w)
        assert torch.equal(packed, narrow.dense_pack(w))  # one layout for every variant
        for m in (1, 2, 4, 6, 7, 9, 12, 13, 25, 100, 128, 129, 200):
            x = torch.randn(m, k, generator=g)
            got = wide.dense_linear(x, packed, b, n)
            want = x.double() @ w.double().T + b.double()
            scale = (x.double().abs() @ w.double().abs().T).max().item() + 1
            assert (got.double() - want).abs().max().item() <= 1e-5 * scale, (n, k, m)
            assert torch.equal(got, narrow.dense_linear(x, packed, b, n)), (n, k, m)
