"""Decode attention with fewer rows than threads splits each row's KV heads between the threads
(fuselm/kernels/paged_attention.c). Every variant this CPU runs, every fast path (float32 queries over a float32
or bfloat16 cache, bfloat16 over bfloat16), KV head counts that split evenly and not: the output and the K/V the
call stores must be bit for bit what one thread gives (a head's arithmetic must not depend on the split), and
the output within float tolerance of a float64 reference over the cache as written."""

from __future__ import annotations

import pytest
import torch

from fuselm.kernels.build import find_compiler, supported_variants
from fuselm.kernels.cpu import load_kernels

VARIANTS = [v for v in supported_variants() if v != "generic"] if find_compiler() else []
pytestmark = pytest.mark.skipif(not VARIANTS, reason="no SIMD kernel variant on this CPU or compiler")


@pytest.fixture(scope="module", params=VARIANTS)
def kernels(request):
    loaded = load_kernels(request.param)
    assert loaded is not None
    return loaded


def reference(q, k_cache, v_cache, table, lens, scale):
    n, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(n, hq, d, dtype=torch.float64)
    for i in range(n):
        slots = [int(table[i, p // bs]) * bs + p % bs for p in range(int(lens[i]))]
        k = k_cache.reshape(-1, hkv, d)[slots].double()
        v = v_cache.reshape(-1, hkv, d)[slots].double()
        for h in range(hq):
            weights = torch.softmax((k[:, h // (hq // hkv)] @ q[i, h].double()) * scale, dim=0)
            out[i, h] = weights @ v[:, h // (hq // hkv)]
    return out


def run(kernels, threads, q, k_cache, v_cache, table, lens, k_new, v_new):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.empty_like(q)
        kc, vc = k_cache.clone(), v_cache.clone()
        kernels.paged_decode_attention(q, out, kc, vc, table, lens, q.shape[2] ** -0.5, k_new=k_new, v_new=v_new)
        return out, kc, vc
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("q_dtype, kv_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("n, hq, hkv, d", [(1, 16, 4, 64), (1, 9, 3, 64), (1, 8, 8, 128), (2, 6, 3, 64),
                                           (1, 4, 1, 64)])
def test_split_heads_give_one_threads_bits(kernels, q_dtype, kv_dtype, n, hq, hkv, d):
    if q_dtype == torch.bfloat16 and not kernels.has_bf16_fast_path:
        pytest.skip("bfloat16 queries take the portable loop here, which never splits")
    g = torch.Generator().manual_seed(n * 1000 + hq * 10 + hkv)
    bs, max_len = 16, 150
    nb = -(-max_len // bs)
    blocks = n * nb + 3
    k_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(kv_dtype)
    v_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(kv_dtype)
    table = torch.randperm(blocks, generator=g)[: n * nb].view(n, nb).contiguous()
    lens = torch.tensor([max_len - 7 * i for i in range(n)], dtype=torch.int64)
    q = torch.randn(n, hq, d, generator=g).to(q_dtype)
    k_new = torch.randn(n, hkv, d, generator=g).to(q_dtype)
    v_new = torch.randn(n, hkv, d, generator=g).to(q_dtype)

    one, k_one, v_one = run(kernels, 1, q, k_cache, v_cache, table, lens, k_new, v_new)
    for threads in (2, 3, 4):
        out, kc, vc = run(kernels, threads, q, k_cache, v_cache, table, lens, k_new, v_new)
        assert torch.equal(out, one), f"{threads} threads"
        assert torch.equal(kc, k_one) and torch.equal(vc, v_one), f"{threads} threads stored other K/V"
    # the new tokens landed in their slots, and the output is attention over the cache as written
    for i in range(n):
        p = int(lens[i]) - 1
        slot = int(table[i, p // bs]) * bs + p % bs
        assert torch.equal(k_one.reshape(-1, hkv, d)[slot], k_new[i].to(kv_dtype))
    tol = 1e-5 if q_dtype == torch.float32 else 2e-2
    assert (one.double() - reference(q.float(), k_one, v_one, table, lens, d ** -0.5)).abs().max().item() < tol
