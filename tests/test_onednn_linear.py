"""oneDNN-packed linears (fuselm/kernels/onednn.py) against F.linear, and the packed bf16 engine
against the plain one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.kernels.onednn import PACKED_MAX_ROWS, PackedLinear, pack_linears, pack_weight

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows", [1, 7, 64, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 600])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(dtype, tol, rows, bias):
    g = torch.Generator().manual_seed(rows)
    lin = nn.Linear(96, 80, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 96, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(80, generator=g))
    packed = pack_weight(lin.weight)
    assert packed is not None
    layer = PackedLinear(lin, packed)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    want = (x.double() @ lin.weight.double().T) + (lin.bias.double() if bias else 0)
    got = layer(x).double()
    assert (got - want).abs().max().item() <= tol * want.abs().max().item()
    assert (F.linear(x, lin.weight, lin.bias).double() - want).abs().max().item() <= tol * want.abs().max().item()


def test_pack_linears_packs_bf16_only():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    assert pack_linears(model, torch.float32) == 0
    model = model.to(torch.bfloat16)
    assert pack_linears(model, torch.bfloat16) == 2
    assert all(isinstance(m, PackedLinear) for m in (model[0], model[2]))


def test_bf16_engine_packed_matches_plain(tiny_llama):
    """cpu_kernels=True (packed linears, packed LM head, C attention) vs the portable bf16 path:
    prompt logprobs agree closely (both are bf16, only the summation order differs)."""
    path, _ = tiny_llama
    prompts = random_prompts([9, 40, 100], seed=43)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    fast = LLM(path, dtype="bfloat16", device="cpu", cpu_kernels=True)
    plain = LLM(path, dtype="bfloat16", device="cpu", cpu_kernels=False)
    assert any(isinstance(m, PackedLinear) for m in fast.engine.runner.model.modules())
    assert not any(isinstance(m, PackedLinear) for m in plain.engine.runner.model.modules())
    for a, b in zip(fast.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            tok = next(iter(pa))
            assert abs(pa[tok].logprob - pb[tok].logprob) < 0.1
