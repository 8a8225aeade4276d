"""Quantised weights in the engine: perplexity on a fixed public-domain text against the
unquantised model, GGUF tensors kept quantised giving the dequantised model's results, the fused
C decode path against the layer-by-layer torch path, and option errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fuselm import LLM, SamplingParams
from fuselm.kernels.cpu import get_kernels

TEXT = Path(__file__).with_name("data") / "public_domain_text.txt"
PROMPTS = ["Hello there, tell me a story.", "What is 2+2?", "Write a poem about the moon and the sun."]


def perplexity(llm: LLM, ids: list[int]) -> float:
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    lps = [next(lp[t].logprob for t in lp if t == tok) for lp, tok in zip(out.prompt_logprobs[1:], ids[1:])]
    return math.exp(-sum(lps) / len(lps))


@pytest.fixture(scope="module")
def text_ids(embedded_llm):
    ids = embedded_llm.get_tokenizer().encode(TEXT.read_text())[:2400]
    assert len(ids) >= 2000
    return ids


@pytest.fixture(scope="module")
def reference_ppl(text_ids):
    """The embedded model dequantised to bfloat16 (the issue's reference precision)."""
    llm = LLM(quantization="none", dtype="bfloat16", max_num_batched_tokens=256, enable_prefix_caching=False)
    return perplexity(llm, text_ids)


def _ppl(text_ids, **options) -> float:
    return perplexity(LLM(max_num_batched_tokens=256, enable_prefix_caching=False, **options), text_ids)


def test_int8_weights_perplexity_within_one_percent(text_ids, reference_ppl):
    got = _ppl(text_ids, quantization="int8")
    assert 1.0 < reference_ppl < 100.0
    assert abs(got - reference_ppl) / reference_ppl < 0.01, (reference_ppl, got)


def test_int4_g32_weights_perplexity_within_five_percent(text_ids, reference_ppl):
    got = _ppl(text_ids, quantization="int4", quantization_group_size=32)
    assert abs(got - reference_ppl) / reference_ppl < 0.05, (reference_ppl, got)


def test_kept_gguf_quantisation_matches_dequantised_model(text_ids):
    """The embedded Q4_1 file kept in int4 computes what the float32 dequantised model computes."""
    kept = _ppl(text_ids, dtype="float32")
    plain = _ppl(text_ids, quantization="none", dtype="float32")
    assert abs(kept - plain) / plain < 1e-3, (plain, kept)


def test_memory_report_names_formats():
    from fuselm.runner.model_runner import summarize_memory

    kept = LLM(kv_cache_memory_bytes=16 << 20)
    plain = LLM(quantization="none", dtype="float32", kv_cache_memory_bytes=16 << 20)
    line = summarize_memory(kept.engine.runner, 2048)
    assert "int4 g32 (gguf:Q4_1)" in line and "int8 g32 (gguf:Q8_0)" in line
    assert kept.engine.runner.weight_bytes * 4 < plain.engine.runner.weight_bytes  # ~92 MiB vs ~620 MiB


@pytest.mark.skipif(get_kernels() is None, reason="needs a C compiler for fuselm's CPU kernels")
@pytest.mark.parametrize("quantization", [None, "none"])  # the GGUF's Q4_1 kept; dequantised (dense_linear.c)
def test_c_layers_match_torch_layers(quantization):
    llm = LLM(max_num_seqs=8, enable_prefix_caching=False, dtype="float32",  # the fused path is float32 only
              quantization=quantization)
    model = llm.engine.runner.model
    assert model.c_layers is not None
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    fused = llm.generate(PROMPTS, params, use_tqdm=False)
    saved, model.c_layers = model.c_layers, None
    try:
        plain = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        model.c_layers = saved
    for a, b in zip(fused, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb, tok in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(la[tok].logprob - lb[tok].logprob) < 5e-3  # float32 summation order; a wrong layer is off by ~1


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_tiny_model_quantised_kernel_and_portable_paths_agree(tiny_llama, method):
    """Round-to-nearest at load time on an HF checkpoint; the C kernel and the portable (CUDA / no
    compiler) path give the same greedy tokens, batched."""
    path = tiny_llama[0]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 33, 2], [7] * 20, list(range(3, 40))]
    runs = []
    for kernels in (True, False):
        llm = LLM(path, dtype="float32", device="cpu", quantization=method, cpu_kernels=kernels)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("options, match", [
    ({"quantization": "int3"}, "quantization must be"),
    ({"quantization": "int4", "quantization_group_size": 48}, "32, 64 or 128"),
    ({"quantization": "int8", "quantization_group_size": 20}, "multiple of 16"),
    ({"quantization_group_size": 32}, "needs quantization"),
])
def test_bad_quantization_options(options, match):
    with pytest.raises(ValueError, match=match):
        LLM(**options)
