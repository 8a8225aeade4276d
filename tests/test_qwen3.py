"""Qwen3 (per-head q/k RMSNorm) against HF transformers' Qwen3ForCausalLM on tiny random weights:
logits, greedy output under heavy chunking, prefix-cache hits, preemption, and a GGUF (arch qwen3)
written the way llama.cpp converts it."""

from __future__ import annotations

import pytest

import family_checks as checks
from conftest import random_prompts
from fuselm import LLM
from test_model_vs_hf import packed_last_logits
from tiny_models import hf_greedy, hf_last_logits, make_tiny_model

LENGTHS = [1, 5, 16, 17, 40, 64, 128, 200]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    return str(path), make_tiny_model(path, "qwen3")


def test_q_k_norms_are_loaded_and_used(qwen3):
    path, hf = qwen3
    model = LLM(path, dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20).engine.runner.model
    attn, ref = model.layers[1].self_attn, hf.model.layers[1].self_attn
    assert (attn.q_norm.weight == ref.q_norm.weight).all() and (attn.k_norm.weight == ref.k_norm.weight).all()
    assert not (ref.q_norm.weight == 1).all()  # the test model's norms are not the identity


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_packed_logits_match_hf(qwen3, cpu_kernels):
    checks.check_packed_logits(*qwen3, LENGTHS, cpu_kernels=cpu_kernels)


@pytest.mark.parametrize("budget", [4096, 16, 7])
def test_greedy_matches_hf_chunked(qwen3, budget):
    checks.check_greedy(*qwen3, LENGTHS, max_num_batched_tokens=budget)


def test_prefix_cache_hits_match_hf(qwen3):
    checks.check_prefix_cache_hits(*qwen3)


def test_preemption_matches_hf(qwen3):
    checks.check_preemption(*qwen3)


def test_gguf_qwen3_matches_hf(qwen3, tmp_path):
    from gguf import GGMLQuantizationType

    from gguf_writer import write_gguf_from_hf

    path, hf = qwen3
    gguf_path = write_gguf_from_hf(hf, path, tmp_path / "qwen3.gguf")
    llm = LLM(str(gguf_path), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20)
    prompts = random_prompts([1, 17, 90], seed=4)
    assert (packed_last_logits(llm, prompts) - hf_last_logits(hf, prompts)).abs().max().item() < 1e-4
    assert checks.greedy(llm, prompts) == [hf_greedy(hf, p, checks.GREEDY_TOKENS) for p in prompts]
    # quantised projections load and stay quantised (Q8_0 is exact up to its rounding)
    q8 = {n: GGMLQuantizationType.Q8_0 for n in hf.state_dict() if n.endswith("proj.weight")}
    quant_path = write_gguf_from_hf(hf, path, tmp_path / "qwen3-q8.gguf", quantize=q8)
    quant = LLM(str(quant_path), dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20)
    assert quant.engine.runner.model.layers[0].self_attn.qkv_proj.kind != "torch"
    assert (packed_last_logits(quant, prompts) - hf_last_logits(hf, prompts)).abs().max().item() < 0.05


def test_c_layer_step_runs_the_q_k_norms(qwen3):
    """The C layer step (decode_layers.c, per-head q/k RMSNorm) against the torch layers on the same engine, and
    HF's greedy tokens."""
    from fuselm import SamplingParams

    path, hf = qwen3
    prompts = random_prompts([3, 9, 17, 30], seed=8)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    options = dict(dtype="float32", device="cpu", max_num_batched_tokens=16, enable_prefix_caching=False)
    runs = []
    for c_layers in (True, False):
        llm = LLM(path, **options)
        assert llm.engine.runner.plan.layers == "c", llm.engine.runner.plan.reasons
        if not c_layers:
            llm.engine.runner.model.c_layers = None
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([(o.outputs[0].token_ids, [s[t].logprob for s, t in zip(o.outputs[0].logprobs,
                                                                            o.outputs[0].token_ids)]) for o in outs])
    for (c_ids, c_lp), (t_ids, t_lp) in zip(*runs):
        assert c_ids == t_ids and max(abs(a - b) for a, b in zip(c_lp, t_lp)) < 1e-4
    assert [ids for ids, _ in runs[0]] == [hf_greedy(hf, p, 8) for p in prompts]
