"""A prompt chunk's causal attention in C (kernels/chunk_attention.c) against a float64 reference over the
chunk's whole context, on random shapes: every ISA variant this CPU runs, float32 / bfloat16 / int8 caches,
GQA groups, chunks with and without a cached context, and chunk lengths around the kernel's tile and
panel sizes."""

from __future__ import annotations

import random

import pytest
import torch

from fuselm.layers.kv_quant import dequantize_rows, quantize_rows

# `kernels`: tests/conftest.py's fixture, the library of each ISA variant this CPU runs in turn


def reference(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, num_cached: int, scale: float) -> torch.Tensor:
    """float64 attention of q [n, Hq, D] at positions num_cached.. over k/v [L, Hkv, D], causal."""
    n, hq, _ = q.shape
    group = hq // k_ctx.shape[1]
    k = k_ctx.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    v = v_ctx.double().repeat_interleave(group, dim=1).transpose(0, 1)
    s = torch.einsum("nhd,hld->hnl", q.double(), k) * scale  # [Hq, n, L]
    pos = torch.arange(num_cached, num_cached + n).unsqueeze(1)
    s = s.masked_fill(torch.arange(k.shape[1]).unsqueeze(0) > pos, float("-inf"))
    return torch.einsum("hnl,hld->nhd", s.softmax(-1), v)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("num_kv_heads,group,head_dim", [(3, 3, 64), (2, 4, 128), (4, 1, 64), (1, 8, 32)])
def test_chunk_attention_matches_reference(kernels, kv_dtype, num_kv_heads, group, head_dim):
    rng = random.Random(hash((str(kv_dtype), num_kv_heads, group, head_dim)) % 1000)
    torch.manual_seed(rng.randrange(1000))
    block_size, pool_blocks = 16, 160
    shapes = [(0, 1), (0, 31), (0, 32), (0, 33), (0, 100), (0, 257), (5, 1), (16, 40), (70, 64), (300, 129), (511, 7)]
    for num_cached, n in shapes:
        length = num_cached + n
        blocks = rng.sample(range(pool_blocks), -(-length // block_size))  # scattered through the pool
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(length)])
        shape = (pool_blocks, block_size, num_kv_heads, head_dim)
        k_val, v_val = torch.randn(shape), torch.randn(shape)
        k_scale = v_scale = None
        if kv_dtype == torch.int8:
            kq, ks = quantize_rows(k_val.view(-1, num_kv_heads, head_dim))
            vq, vs = quantize_rows(v_val.view(-1, num_kv_heads, head_dim))
            k_cache, v_cache = kq.view(shape), vq.view(shape)
            k_scale, v_scale = ks.view(shape[:3]), vs.view(shape[:3])
            k_ref = dequantize_rows(kq, ks, torch.float32)
            v_ref = dequantize_rows(vq, vs, torch.float32)
        else:
            k_cache, v_cache = k_val.to(kv_dtype), v_val.to(kv_dtype)
            k_ref = k_cache.float().view(-1, num_kv_heads, head_dim)
            v_ref = v_cache.float().view(-1, num_kv_heads, head_dim)
        q = torch.randn(n, num_kv_heads * group, head_dim)
        scale = head_dim ** -0.5
        out = torch.full_like(q, float("nan"))
        kernels.chunk_attention(q, out, k_cache, v_cache, slots, num_cached, scale, k_scale, v_scale)
        want = reference(q, k_ref[slots], v_ref[slots], num_cached, scale)
        err = (out.double() - want).abs().max().item()
        assert err < 2e-5, (num_cached, n, err)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_queries_match_reference(kernels, kv_dtype):
    """A bfloat16 model's chunks: results rounded to bfloat16, within that rounding of the float64 reference. Over a
    bfloat16 cache with AVX-512-BF16 the products are bf16 pairs with P rounded to bf16 (cascade_panel.h's bf16
    panels): their mean error stays within 1.75x that of the exact result rounded once (flat attention over long
    contexts is the worst case: P's rounding is then as large as the output's; 1.3-1.55x measured)."""
    torch.manual_seed(5)
    block_size, pool_blocks, num_kv_heads, group, head_dim = 16, 80, 3, 3, 64
    for num_cached, n in [(0, 33), (0, 200), (40, 64), (300, 17)]:
        length = num_cached + n
        blocks = random.Random(n).sample(range(pool_blocks), -(-length // block_size))
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(length)])
        shape = (pool_blocks, block_size, num_kv_heads, head_dim)
        k_cache, v_cache = torch.randn(shape).to(kv_dtype), torch.randn(shape).to(kv_dtype)
        q = torch.randn(n, num_kv_heads * group, head_dim).to(torch.bfloat16)
        out = torch.full_like(q, float("nan"))
        kernels.chunk_attention(q, out, k_cache, v_cache, slots, num_cached, head_dim ** -0.5)
        flat_k, flat_v = (c.float().view(-1, num_kv_heads, head_dim)[slots] for c in (k_cache, v_cache))
        want = reference(q.float(), flat_k, flat_v, num_cached, head_dim ** -0.5)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), want.to(torch.bfloat16).double(), atol=8e-3, rtol=8e-3)
        rounding = (want.to(torch.bfloat16).double() - want).abs().mean()
        assert (out.double() - want).abs().mean() <= 1.75 * rounding


def test_chunk_attention_rejects_what_it_does_not_take(kernels):
    q = torch.randn(4, 3, 64).to(torch.float16)
    cache = torch.randn(8, 16, 1, 64)
    assert not kernels.chunk_attention_supports(q, cache)
    assert kernels.chunk_attention_supports(q.float(), cache)
    assert kernels.chunk_attention_supports(q.bfloat16(), cache)
    assert not kernels.chunk_attention_supports(torch.randn(4, 3, 18), torch.randn(8, 16, 1, 18))  # 18 % 4 != 0
