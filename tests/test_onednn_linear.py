"""oneDNN-packed linears (fuselm/kernels/onednn.py) against F.linear, and the packed bf16 engine
against the plain one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.kernels.onednn import PACKED_MAX_ROWS, OneDNNLinear, pack_weight
from fuselm.layers.linear import TorchLinear
from fuselm.runner.execution_plan import choose_linear

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
        assert packed is None  # this CPU cannot run oneDNN's bf16 path: the layer stays on F.linear
        return
    assert packed is not None
    layer = OneDNNLinear(lin.weight, lin.bias, packed)
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
@pytest.mark.parametrize("role", ["qkv", "lm_head"])
def test_plan_chooses_onednn_without_fuselm_gemm(dtype, role):
    """Without fuselm's C kernels the execution plan's linear choice packs float32/bf16 projections for
    oneDNN: same results as the plain layer (LM head: on the packed weight at every row count)."""
    plain = TorchLinear(16, 12, bias=role != "lm_head").to(dtype)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(12, 16))
        if plain.bias is not None:
            plain.bias.copy_(torch.randn(12))
    x = torch.randn(PACKED_MAX_ROWS + 3, 16).to(dtype)
    want = plain(x)
    chosen = choose_linear(plain, None, onednn=True, role=role)
    if dtype == torch.bfloat16 and not onednn_packs_bf16():
        assert chosen is plain
        return
    assert isinstance(chosen, OneDNNLinear) and chosen.kind == "onednn"
    assert (chosen.weight is None) == (dtype == torch.float32 or role == "lm_head")  # only bf16 layers keep it
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for rows in (1, 5, PACKED_MAX_ROWS + 3):
        assert (chosen(x[:rows]).float() - want[:rows].float()).abs().max().item() <= tol * want.abs().max().item()


def test_bf16_engine_packed_matches_plain(tiny_llama):
    """cpu_kernels=True (packed linears, packed LM head, C attention) vs the portable bf16 path:
    prompt logprobs agree closely (both are bf16, only the summation order differs)."""
    path, _ = tiny_llama
    prompts = random_prompts([9, 40, 100], seed=43)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    fast = LLM(path, dtype="bfloat16", device="cpu", cpu_kernels=True)
    plain = LLM(path, dtype="bfloat16", device="cpu", cpu_kernels=False)
    assert any(isinstance(m, OneDNNLinear) for m in fast.engine.runner.model.modules()) == onednn_packs_bf16()
    assert not any(isinstance(m, OneDNNLinear) for m in plain.engine.runner.model.modules())
    assert plain.engine.runner.plan.linear["qkv"] == "torch" and plain.engine.runner.plan.attention == "torch-sdpa"
    for a, b in zip(fast.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            tok = next(iter(pa))
            assert abs(pa[tok].logprob - pb[tok].logprob) < 0.1
