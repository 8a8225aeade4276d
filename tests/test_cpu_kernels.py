"""The C paged-decode-attention kernel against a float64 reference on random inputs of many shapes."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.kernels.cpu import get_kernels

kernels = get_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="no C compiler: the torch path is used and tested elsewhere")


def reference(q, k_cache, v_cache, table, lens, scale):
    n, hq, d = q.shape
    hkv = k_cache.shape[2]
    bs = k_cache.shape[1]
    out = torch.empty(n, hq, d, dtype=torch.float64)
    for i in range(n):
        L = int(lens[i])
        slots = [int(table[i, p // bs]) * bs + p % bs for p in range(L)]
        k = k_cache.reshape(-1, hkv, d)[slots].double()  # [L, Hkv, D]
        v = v_cache.reshape(-1, hkv, d)[slots].double()
        for h in range(hq):
            kv = h // (hq // hkv)
            w = torch.softmax((k[:, kv] @ q[i, h].double()) * scale, dim=0)  # [L]
            out[i, h] = w @ v[:, kv]
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n, hq, hkv, d, bs, max_len", [
    (1, 1, 1, 8, 1, 1), (3, 4, 2, 16, 4, 37), (5, 9, 3, 64, 16, 300), (2, 8, 8, 128, 16, 70),
    (4, 14, 2, 64, 32, 129), (6, 32, 8, 128, 16, 50),
])
def test_kernel_matches_float64_reference(dtype, tol, n, hq, hkv, d, bs, max_len):
    g = torch.Generator().manual_seed(n * 1000 + d)
    nb = -(-max_len // bs)
    num_blocks = n * nb + 3
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    table = torch.randperm(num_blocks, generator=g)[: n * nb].view(n, nb).contiguous()
    lens = torch.randint(1, max_len + 1, (n,), generator=g)
    lens[0] = max_len
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    out = torch.empty_like(q)
    scale = d ** -0.5
    kernels.paged_decode_attention(q, out, k_cache, v_cache, table, lens, scale)
    ref = reference(q, k_cache, v_cache, table, lens, scale)
    assert (out.double() - ref).abs().max().item() < tol


def test_engine_kernel_and_torch_paths_agree(tiny_llama):
    path, _ = tiny_llama
    prompts = random_prompts([1, 30, 77, 140], seed=40)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    fast = LLM(path, dtype="float32", device="cpu", cpu_kernels=True)
    plain = LLM(path, dtype="float32", device="cpu", cpu_kernels=False)
    assert fast.engine.runner.cpu_kernels is not None and plain.engine.runner.cpu_kernels is None
    a = fast.generate(prompts, params, use_tqdm=False)
    b = plain.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            for tok in lx:
                assert abs(lx[tok].logprob - ly[tok].logprob) < 1e-4
