"""The C paged attention kernel with a sliding window (a first position per query row) against a
float64 reference, for every ISA variant this CPU runs and each of its paths (bf16 queries over a
bf16 cache, float32 queries over a float32 or bf16 cache, the portable loop). Rows the window has
left behind hold NaN, and blocks before the window's first block are pointed at a NaN block: a
kernel that read either into its result would fail."""

from __future__ import annotations

import pytest
import torch

from fuselm.kernels.build import find_compiler

HAVE_COMPILER = find_compiler() is not None
pytestmark = pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler: the torch path is used and tested elsewhere")


def windowed_reference(q, k_cache, v_cache, table, lens, starts, scale):
    n, hq, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(n, hq, d, dtype=torch.float64)
    for i in range(n):
        slots = [int(table[i, p // bs]) * bs + p % bs for p in range(int(starts[i]), int(lens[i]))]
        k = k_cache.reshape(-1, hkv, d)[slots].double()  # [window, Hkv, D]
        v = v_cache.reshape(-1, hkv, d)[slots].double()
        for h in range(hq):
            kv = h // (hq // hkv)
            out[i, h] = torch.softmax((k[:, kv] @ q[i, h].double()) * scale, dim=0) @ v[:, kv]
    return out


@pytest.mark.parametrize("dtype, kv_dtype, tol", [(torch.float32, torch.float32, 1e-5),
                                                  (torch.float32, torch.bfloat16, 1e-5),
                                                  (torch.bfloat16, torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n, hq, hkv, d, bs, max_len, window", [
    (4, 4, 2, 64, 16, 300, 40), (3, 8, 8, 128, 16, 200, 17), (5, 6, 2, 32, 8, 97, 8),
    (3, 4, 2, 12, 4, 60, 9), (2, 3, 1, 64, 16, 15, 1), (4, 14, 2, 64, 32, 129, 64),
])
def test_window_matches_float64_reference(kernels, dtype, kv_dtype, tol, n, hq, hkv, d, bs, max_len, window):
    g = torch.Generator().manual_seed(n * 100 + d + window)
    nb = -(-max_len // bs)
    num_blocks = n * nb + 1
    nan_block = num_blocks - 1
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g)
    table = torch.randperm(num_blocks - 1, generator=g).view(n, nb).contiguous()
    lens = torch.randint(1, max_len + 1, (n,), generator=g)
    lens[0] = max_len
    starts = (lens - window).clamp_min(0)
    for i in range(n):  # what the window left behind: NaN rows, and dead blocks replaced by the NaN block
        first = int(starts[i])
        for p in range(first - first % bs, first):
            k_cache[table[i, p // bs], p % bs] = float("nan")
            v_cache[table[i, p // bs], p % bs] = float("nan")
        table[i, : first // bs] = nan_block
    k_cache[nan_block] = float("nan")
    v_cache[nan_block] = float("nan")
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    out = torch.empty_like(q)
    scale = d ** -0.5
    kernels.paged_decode_attention(q, out, k_cache, v_cache, table, lens, scale, ctx_starts=starts)
    ref = windowed_reference(q, k_cache, v_cache, table, lens, starts, scale)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max().item() < tol


def test_window_with_stored_rows(kernels):
    """Rows that store their own new K/V (decodes) under a window: the store and the read agree."""
    g = torch.Generator().manual_seed(3)
    n, hq, hkv, d, bs, window = 3, 4, 2, 64, 16, 20
    lens = torch.tensor([70, 5, 33])
    nb = 5
    k_cache = torch.randn(n * nb, bs, hkv, d, generator=g)
    v_cache = torch.randn(n * nb, bs, hkv, d, generator=g)
    table = torch.arange(n * nb).view(n, nb)
    k_new = torch.randn(n, hkv, d, generator=g)
    v_new = torch.randn(n, hkv, d, generator=g)
    q = torch.randn(n, hq, d, generator=g)
    starts = (lens - window).clamp_min(0)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for i in range(n):
        p = int(lens[i]) - 1
        expected_k[table[i, p // bs], p % bs] = k_new[i]
        expected_v[table[i, p // bs], p % bs] = v_new[i]
    out = torch.empty_like(q)
    kernels.paged_decode_attention(q, out, k_cache, v_cache, table, lens, d ** -0.5, k_new, v_new, ctx_starts=starts)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    ref = windowed_reference(q, expected_k, expected_v, table, lens, starts, d ** -0.5)
    assert (out.double() - ref).abs().max().item() < 1e-5
