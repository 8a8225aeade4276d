"""The AVX-512 decode attention path for float32 queries (fuselm/kernels/attention_f32_avx512.h)
against a float64 reference (whole contexts, sliding-window starts, float32 and bfloat16 caches),
against the AVX2 path it replaces in the AVX-512 builds, and a row's output against the same row
computed in another batch (speculative verification relies on it being bit for bit the same)."""

from __future__ import annotations

import pytest
import torch

from fuselm.kernels.build import find_compiler, supported_variants
from fuselm.kernels.cpu import load_kernels

AVX512_VARIANTS = [v for v in supported_variants() if v.startswith("avx512")] if find_compiler() else []
pytestmark = pytest.mark.skipif(not AVX512_VARIANTS, reason="this CPU or compiler has no AVX-512 kernel variant")


@pytest.fixture(scope="module", params=AVX512_VARIANTS)
def kernels(request):
    loaded = load_kernels(request.param)
    assert loaded is not None and loaded.has_f32_avx512_attention
    return loaded


def make_case(n, hq, hkv, d, bs, max_len, kv_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    nb = -(-max_len // bs)
    num_blocks = n * nb + 2
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(kv_dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(kv_dtype)
    table = torch.randperm(num_blocks, generator=g)[: n * nb].view(n, nb).contiguous()
    lens = torch.randint(1, max_len + 1, (n,), generator=g)
    lens[0] = max_len
    q = torch.randn(n, hq, d, generator=g)
    return q, k_cache, v_cache, table, lens


def reference(q, k_cache, v_cache, table, lens, starts, scale):
    n, hq, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(n, hq, d, dtype=torch.float64)
    for i in range(n):
        positions = range(int(starts[i]), int(lens[i]))
        slots = [int(table[i, p // bs]) * bs + p % bs for p in positions]
        k = k_cache.reshape(-1, hkv, d)[slots].double()
        v = v_cache.reshape(-1, hkv, d)[slots].double()
        for h in range(hq):
            kv = h // (hq // hkv)
            weights = torch.softmax((k[:, kv] @ q[i, h].double()) * scale, dim=0)
            out[i, h] = weights @ v[:, kv]
    return out


@pytest.mark.parametrize("kv_dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("n, hq, hkv, d, bs, max_len, windowed", [
    (5, 9, 3, 64, 16, 300, False), (4, 9, 3, 64, 16, 300, True), (3, 8, 2, 128, 32, 150, False),
    (3, 4, 4, 32, 16, 70, True), (2, 6, 2, 48, 16, 17, False),
])
def test_matches_float64_reference(kernels, kv_dtype, tol, n, hq, hkv, d, bs, max_len, windowed):
    q, k_cache, v_cache, table, lens = make_case(n, hq, hkv, d, bs, max_len, kv_dtype, seed=n * 100 + d)
    starts = (lens - 40).clamp(min=0) if windowed else torch.zeros_like(lens)
    out = torch.empty_like(q)
    scale = d ** -0.5
    kernels.paged_decode_attention(q, out, k_cache, v_cache, table, lens, scale,
                                   ctx_starts=starts.contiguous() if windowed else None)
    assert (out.double() - reference(q, k_cache, v_cache, table, lens, starts, scale)).abs().max().item() < tol


def test_agrees_with_the_avx2_path():
    avx2 = load_kernels("avx2")
    if avx2 is None:
        pytest.skip("no AVX2 variant here")
    q, k_cache, v_cache, table, lens = make_case(6, 9, 3, 64, 16, 400, torch.float32, seed=7)
    outs = []
    for variant in (avx2, load_kernels(AVX512_VARIANTS[0])):
        out = torch.empty_like(q)
        variant.paged_decode_attention(q, out, k_cache, v_cache, table, lens, 0.125)
        outs.append(out)
    assert not avx2.has_f32_avx512_attention
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def test_a_row_gives_the_same_bits_in_any_batch(kernels):
    q, k_cache, v_cache, table, lens = make_case(7, 9, 3, 64, 16, 333, torch.float32, seed=3)
    batch_out = torch.empty_like(q)
    kernels.paged_decode_attention(q, batch_out, k_cache, v_cache, table, lens, 0.125)
    for i in (0, 3, 6):
        alone = torch.empty_like(q[i:i + 1])
        kernels.paged_decode_attention(q[i:i + 1].contiguous(), alone, k_cache, v_cache, table[i:i + 1].contiguous(),
                                       lens[i:i + 1].contiguous(), 0.125)
        assert torch.equal(alone[0], batch_out[i])
