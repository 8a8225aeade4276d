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
    if dtype == torch.bfloat16 and not onednn_packs_bf16():
        assert packed is None  # this CPU cannot run oneDNN's bf16 path: the layer stays a plain nn.Linear
        assert pack_linears(nn.Sequential(lin), dtype) == 0
        return
    assert packed is not None
    layer = PackedLinear(lin, packed)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    want = (x.double() @ lin.weight.double().T) + (lin.bias.double() if bias else 0)
    got = layer(x).double()
    assert (got - want).abs().max().item() <= tol * want.abs().max().item()
    assert (F.linear(x, lin.weight, lin.bias).double() - want).abs().max().item() <= tol * want.abs().max().item()


def onednn_packs_bf16() -> bool:
    """oneDNN's bf16 linear needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; an AVX2-only CPU has neither."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=torch.bfloat16), 8)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_linears_replaces_every_linear(dtype):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    x = torch.randn(5, 16).to(dtype)
    want = model(x)
    if dtype == torch.bfloat16 and not onednn_packs_bf16():
        assert pack_linears(model, dtype) == 0
        return
    assert pack_linears(model, dtype) == 2
    assert all(isinstance(m, PackedLinear) for m in (model[0], model[2]))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (model(x).float() - want.float()).abs().max().item() <= tol * want.abs().max().item()


def test_bf16_engine_packed_matches_plain(tiny_llama):
    """cpu_kernels=True (packed linears, packed LM head, C attention) vs the portable bf16 path:
    prompt logprobs agree closely (both are bf16, only the summation order differs)."""
    path, _ = tiny_llama
    prompts = random_prompts([9, 40, 100], seed=43)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    fast = LLM(path, dtype="bfloat16", device="cpu", cpu_kernels=True)
    plain = LLM(path, dtype="bfloat16", device="cpu", cpu_kernels=False)
    assert any(isinstance(m, PackedLinear) for m in fast.engine.runner.model.modules()) == onednn_packs_bf16()
    assert not any(isinstance(m, PackedLinear) for m in plain.engine.runner.model.modules())
    for a, b in zip(fast.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            tok = next(iter(pa))
            assert abs(pa[tok].logprob - pb[tok].logprob) < 0.1
