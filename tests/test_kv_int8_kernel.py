"""The C decode attention over an int8 KV cache (kernels/paged_attention_int8.c) against the portable
int8 path (dequantise, then SDPA: fuselm/layers/paged_attention.py) and a float64 reference, its
stores against kv_quant.quantize_rows bit for bit, and the engine's int8 cache through the C layers
against the same engine on the torch path, for every ISA variant this CPU runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.kernels.build import find_compiler
from fuselm.kernels.cpu import get_kernels
from fuselm.layers.kv_quant import dequantize_rows, quantize_rows

HAVE_COMPILER = find_compiler() is not None
pytestmark = pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler: the torch path is used and tested elsewhere")


def int8_cache(g, num_blocks, bs, hkv, d):
    """A random int8 cache and its scales, rows of varied magnitude, as write_kv would store them."""
    x = torch.randn(num_blocks, bs, hkv, d, generator=g) * torch.rand(num_blocks, bs, hkv, 1, generator=g) * 4
    return quantize_rows(x)


def portable_int8(q, k_cache, k_scale, v_cache, v_scale, table, lens, scale):
    """The torch path's query rows: gather the dequantised context, one SDPA over a padding mask."""
    n, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    max_len = int(lens.max())
    slots = (table.unsqueeze(-1) * bs + torch.arange(bs)).view(n, -1)[:, :max_len]  # [n, L]
    valid = torch.arange(max_len).unsqueeze(0) < lens.unsqueeze(1)
    slots = torch.where(valid, slots, 0)
    k = dequantize_rows(k_cache.view(-1, hkv, d)[slots], k_scale.view(-1, hkv)[slots], torch.float32).transpose(1, 2)
    v = dequantize_rows(v_cache.view(-1, hkv, d)[slots], v_scale.view(-1, hkv)[slots], torch.float32).transpose(1, 2)
    qd = q.float().reshape(n, hkv, hq // hkv, d)
    o = F.scaled_dot_product_attention(qd, k, v, attn_mask=valid.view(n, 1, 1, max_len), scale=scale)
    return o.reshape(n, hq, d)


def float64_reference(q, k_cache, k_scale, v_cache, v_scale, table, lens, scale):
    n, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(n, hq, d, dtype=torch.float64)
    for i in range(n):
        slots = [int(table[i, p // bs]) * bs + p % bs for p in range(int(lens[i]))]
        k = k_cache.view(-1, hkv, d)[slots].double() * k_scale.view(-1, hkv)[slots].double().unsqueeze(-1)
        v = v_cache.view(-1, hkv, d)[slots].double() * v_scale.view(-1, hkv)[slots].double().unsqueeze(-1)
        for h in range(hq):
            kv = h // (hq // hkv)
            w = torch.softmax((k[:, kv] @ q[i, h].double()) * scale, dim=0)
            out[i, h] = w @ v[:, kv]
    return out


@pytest.mark.parametrize("n, hq, hkv, d, bs, max_len", [
    (1, 1, 1, 8, 1, 1), (3, 4, 2, 16, 4, 37), (5, 9, 3, 64, 16, 300), (2, 8, 8, 128, 16, 70),
    (4, 14, 2, 64, 32, 129), (3, 6, 2, 32, 64, 200), (2, 3, 1, 48, 16, 15),
])
def test_int8_kernel_matches_portable_path_and_float64(kernels, n, hq, hkv, d, bs, max_len):
    g = torch.Generator().manual_seed(n * 100 + d)
    nb = -(-max_len // bs)
    num_blocks = n * nb + 2
    k_cache, k_scale = int8_cache(g, num_blocks, bs, hkv, d)
    v_cache, v_scale = int8_cache(g, num_blocks, bs, hkv, d)
    table = torch.randperm(num_blocks, generator=g)[: n * nb].view(n, nb).contiguous()
    lens = torch.randint(1, max_len + 1, (n,), generator=g)
    lens[0] = max_len
    q = torch.randn(n, hq, d, generator=g)
    out = torch.empty_like(q)
    scale = d ** -0.5
    kernels.paged_decode_attention(q, out, k_cache, v_cache, table, lens, scale, k_scale=k_scale, v_scale=v_scale)
    exact = float64_reference(q, k_cache, k_scale, v_cache, v_scale, table, lens, scale)
    assert (out.double() - exact).abs().max().item() < 1e-5
    portable = portable_int8(q, k_cache, k_scale, v_cache, v_scale, table, lens, scale)
    assert (out - portable).abs().max().item() < 1e-5


def test_int8_kernel_bf16_queries(kernels):
    g = torch.Generator().manual_seed(3)
    n, hq, hkv, d, bs, max_len = 3, 9, 3, 64, 16, 90
    nb = -(-max_len // bs)
    k_cache, k_scale = int8_cache(g, n * nb, bs, hkv, d)
    v_cache, v_scale = int8_cache(g, n * nb, bs, hkv, d)
    table = torch.arange(n * nb).view(n, nb)
    lens = torch.tensor([90, 1, 47])
    q = torch.randn(n, hq, d, generator=g).to(torch.bfloat16)
    out = torch.empty_like(q)
    kernels.paged_decode_attention(q, out, k_cache, v_cache, table, lens, d ** -0.5, k_scale=k_scale, v_scale=v_scale)
    exact = float64_reference(q, k_cache, k_scale, v_cache, v_scale, table, lens, d ** -0.5)
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4).all()  # bf16 output rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_stores_new_rows_as_quantize_rows(kernels, dtype):
    """The kernel quantises each row's new K/V into its slot (the context's last position) exactly as
    the portable path's write_kv does, and attends to it in the same call."""
    g = torch.Generator().manual_seed(11)
    n, hq, hkv, d, bs = 4, 6, 2, 64, 16
    k_cache, k_scale = int8_cache(g, 12, bs, hkv, d)
    v_cache, v_scale = int8_cache(g, 12, bs, hkv, d)
    table = torch.randperm(12, generator=g)[:12].view(n, 3).contiguous()
    lens = torch.tensor([1, 16, 17, 48])
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    k_new = (torch.randn(n, hkv, d, generator=g) * 3).to(dtype)
    v_new = (torch.randn(n, hkv, d, generator=g) * 3).to(dtype)
    k_new[2, 1] = 0.0  # an all-zero row takes the tiny scale
    before = k_cache.clone(), v_cache.clone()
    out = torch.empty_like(q)
    kernels.paged_decode_attention(q, out, k_cache, v_cache, table, lens, d ** -0.5, k_new, v_new, k_scale, v_scale)
    slots = torch.tensor([int(table[i, (int(lens[i]) - 1) // bs]) * bs + (int(lens[i]) - 1) % bs for i in range(n)])
    for cache, scales, new in ((k_cache, k_scale, k_new), (v_cache, v_scale, v_new)):
        want_q, want_s = quantize_rows(new)
        assert torch.equal(cache.view(-1, hkv, d)[slots], want_q)
        assert torch.equal(scales.view(-1, hkv)[slots], want_s)
    untouched = torch.ones(12 * bs, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(k_cache.view(-1, hkv, d)[untouched], before[0].view(-1, hkv, d)[untouched])
    exact = float64_reference(q, k_cache, k_scale, v_cache, v_scale, table, lens, d ** -0.5)
    tol = exact.abs() * (1e-6 if dtype == torch.float32 else 2 ** -8) + 1e-5
    assert ((out.double() - exact).abs() <= tol).all()


def test_engine_int8_cache_takes_the_c_path_and_agrees_with_torch(tiny_llama):
    """The int8 cache runs the C decode step (decode_layers.c) and the C prompt halves, and gives the
    torch path's greedy tokens and logprobs, through chunked prompts and speculative verification."""
    if get_kernels() is None:
        pytest.skip("the C kernels cannot be loaded")
    path, _ = tiny_llama
    prompts = random_prompts([1, 30, 77, 140, 9], seed=42)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    options = dict(dtype="float32", device="cpu", kv_cache_dtype="int8", max_num_batched_tokens=64)
    fast = LLM(path, **options)
    plain = LLM(path, cpu_kernels=False, **options)
    plan = fast.engine.runner.plan
    assert plan.attention == "c-paged"
    if get_kernels().has_simd_dense:
        assert plan.layers == "c"
    for a, b in zip(fast.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tok in la:
                assert abs(la[tok].logprob - lb[tok].logprob) < 1e-4
    spec = LLM(path, speculative_config={"method": "ngram", "num_speculative_tokens": 3}, **options)
    repeat = [list(range(20, 40)) * 4]
    want = plain.generate(repeat, params, use_tqdm=False)[0].outputs[0].token_ids
    assert spec.generate(repeat, params, use_tqdm=False)[0].outputs[0].token_ids == want
