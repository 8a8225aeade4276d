"""The execution plan (fuselm/runner/execution_plan.py) says what runs: its line names the linear
method of every projection, the attention, the norm and the layer path the model really uses, and
the engine logs it once at load. Each configuration's outputs are compared with the portable path."""

from __future__ import annotations

import logging

import pytest

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.kernels.cpu import get_kernels
from fuselm.layers.linear import LinearMethod

CONFIGS = [
    dict(dtype="float32"),
    dict(dtype="bfloat16"),
    dict(dtype="float32", quantization="int4"),
    dict(dtype="float32", quantization="int8", quantize_lm_head=True),
    dict(dtype="float32", kv_cache_dtype="int8"),
    dict(dtype="float32", cpu_kernels=False),
]


def installed(model) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for parent, attr, role in model.linear_methods():
        module = getattr(parent, attr)
        assert isinstance(module, LinearMethod)
        kinds.setdefault(role, set()).add(module.kind)
    return kinds


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_plan_line_describes_the_installed_model(tiny_model_factory, caplog, options):
    path, _ = tiny_model_factory("qwen2_bias")
    with caplog.at_level(logging.INFO, logger="fuselm"):
        llm = LLM(path, device="cpu", kv_cache_memory_bytes=8 << 20, **options)
    runner = llm.engine.runner
    plan, model = runner.plan, runner.model
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("execution plan")]
    assert lines == [plan.summary()]
    assert {role: set(kinds.split("|")) for role, kinds in plan.linear.items()} == installed(model)
    assert (plan.layers == "c") == (model.c_layers is not None)
    assert (plan.attention == "c-paged") == (runner.cpu_kernels is not None)
    for role, kinds in plan.linear.items():
        assert f"{kinds}" in lines[0] and role in lines[0]
    if options.get("cpu_kernels") is False:
        assert plan.attention == "torch-sdpa" and set(plan.linear.values()) <= {"torch", "int4g32-dequant"}
        assert "cpu_kernels is off" in lines[0]
    if options.get("kv_cache_dtype") == "int8" and get_kernels() is not None:
        assert plan.attention == "c-paged"  # paged_attention_int8.c reads the int8 cache
    if get_kernels() is not None and options == dict(dtype="float32") and get_kernels().has_simd_dense:
        assert plan.layers == "c" and plan.linear["qkv"] == "fuselm-fp32-gemm"

    # whatever the plan chose computes what the portable path computes
    plain = LLM(path, device="cpu", kv_cache_memory_bytes=8 << 20, cpu_kernels=False,
                **{k: v for k, v in options.items() if k != "cpu_kernels"})
    prompts = random_prompts([7, 30], seed=3)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    tol = 0.1 if options["dtype"] == "bfloat16" else 2e-2
    for a, b in zip(llm.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            tok = next(iter(pa))
            assert abs(pa[tok].logprob - pb[tok].logprob) < tol


def test_tied_lm_head_shares_the_embedding_table(tiny_model_factory):
    """A tied LM head is the embedding table (one copy) on the portable path, and the weight total
    counts it once."""
    path, _ = tiny_model_factory("llama_tied")
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_memory_bytes=8 << 20, cpu_kernels=False)
    model = llm.engine.runner.model
    assert model.lm_head.weight is model.embed_tokens.weight
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # torch dedupes shared parameters
    assert llm.engine.runner.weight_bytes == params
