"""`quantization="int8"|"int4"` at load quantises an MoE model's experts too: the stacked QuantWeight
equals quantising each HF expert alone, the C expert kernel runs it, and the logits match the
dequantised reference (the portable torch path, which multiplies by the dequantised weights)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from fuselm import LLM
from fuselm.quant.formats import quantize
from moe_models import make_tiny_moe
from test_model_vs_hf import packed_last_logits


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-q")
    return path, make_tiny_moe(path, "mixtral", expert_intermediate=128)


@pytest.mark.parametrize("method, label", [("int8", "int8g32"), ("int4", "int4g32")])
def test_experts_are_quantised_at_load(mixtral, method, label):
    path, hf = mixtral
    options = dict(dtype="float32", device="cpu", quantization=method, quantization_group_size=32,
                   max_num_batched_tokens=4096)
    llm = LLM(str(path), **options)
    assert llm.engine.runner.plan.linear["experts"] == f"c-grouped-{label}"
    experts = llm.engine.runner.model.layers[0].mlp.experts
    for e in (0, experts.num_experts - 1):  # the stacked rows of expert e are that expert quantised alone
        mine = experts.down.expert_quant(e).dequantize(torch.float32)
        alone = quantize(hf.model.layers[0].mlp.experts.down_proj[e].detach(), method, 32).dequantize(torch.float32)
        assert torch.equal(mine, alone)

    reference = LLM(str(path), cpu_kernels=False, **options)
    assert reference.engine.runner.plan.linear["experts"] == f"torch-grouped-{label}"
    prompts = random_prompts([1, 7, 19, 40], seed=3)
    ours, want = packed_last_logits(llm, prompts), packed_last_logits(reference, prompts)
    # the C kernels round activations to int16 per 32 values (kernels/quant_linear.c)
    assert (ours - want).abs().max().item() < 2e-3 * max(1.0, want.abs().max().item())
    assert llm.engine.runner.weight_bytes < LLM(str(path), dtype="float32", device="cpu").engine.runner.weight_bytes
