"""int8 KV cache (kv_cache_dtype="int8"): quantisation error bounds, capacity, perplexity within 1%
of the unquantised cache, and the scheduling paths (batching, chunking, prefix hits, preemption)
giving the same greedy tokens as the int8 engine run alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.layers.kv_quant import dequantize_rows, quantize_rows

TEXT = Path(__file__).with_name("data") / "public_domain_text.txt"
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_quantize_round_trip_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 64, generator=g) * torch.rand(64, 4, 1, generator=g) * 10  # rows of varied scale
    x[3, 2] = 0.0  # an all-zero row stays exactly zero
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and s.shape == (64, 4) and s.dtype == torch.bfloat16
    back = dequantize_rows(q, s, torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    # int8 rounding (half a step) plus the bf16-rounded scale clipping the largest value
    assert ((back - x).abs() <= s.float().unsqueeze(-1) / 2 + amax * 2 ** -8 + 1e-12).all()
    assert (back[3, 2] == 0).all()
    assert (q.abs() <= 127).all()


def test_int8_cache_holds_more_tokens():
    budget = 64 << 20
    sizes = {kv: LLM(kv_cache_dtype=kv, kv_cache_memory_bytes=budget, dtype="float32").engine.runner.num_blocks
             for kv in ("float32", "bfloat16", "int8")}
    assert sizes["int8"] >= 1.9 * sizes["bfloat16"]  # head_dim 64: 128 bytes vs 64 + 2
    assert sizes["int8"] >= 3.7 * sizes["float32"]


def perplexity(llm: LLM, ids: list[int]) -> float:
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    lps = [next(lp[t].logprob for t in lp if t == tok) for lp, tok in zip(out.prompt_logprobs[1:], ids[1:])]
    return math.exp(-sum(lps) / len(lps))


def test_int8_kv_perplexity_within_one_percent(embedded_llm):
    ids = embedded_llm.get_tokenizer().encode(TEXT.read_text())[:2400]
    assert len(ids) >= 2000
    # 256-token chunks: every chunk after the first attends to (quantised) cached keys and values
    ref = perplexity(LLM(max_num_batched_tokens=256, enable_prefix_caching=False), ids)
    q8 = perplexity(LLM(max_num_batched_tokens=256, enable_prefix_caching=False, kv_cache_dtype="int8"), ids)
    assert 1.0 < ref < 100.0
    assert abs(q8 - ref) / ref < 0.01, (ref, q8)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([3, 9, 33, 70, 150, 17, 48, 100], seed=5)


@pytest.fixture(scope="module")
def reference(tiny_llama, prompts):
    llm = LLM(tiny_llama[0], dtype="float32", device="cpu", kv_cache_dtype="int8", max_num_batched_tokens=4096,
              enable_prefix_caching=False)
    return [o.outputs[0].token_ids for p in prompts for o in llm.generate([p], GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("options", [
    {"max_num_batched_tokens": 4096},  # batched
    {"max_num_batched_tokens": 16},  # heavy chunking
    {"max_num_batched_tokens": 64, "kv_blocks": 20},  # forced preemption
])
def test_int8_paths_equal_alone(tiny_llama, prompts, reference, options):
    path = tiny_llama[0]
    options = dict(options)
    blocks = options.pop("kv_blocks", None)
    if blocks:
        per_block = LLM(path, dtype="float32", device="cpu", kv_cache_dtype="int8").engine.runner.bytes_per_block
        options["kv_cache_memory_bytes"] = blocks * per_block
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_dtype="int8", **options)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    if blocks:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks


def test_int8_prefix_hits_equal_no_cache(tiny_llama):
    path = tiny_llama[0]
    shared = random_prompts([3 * 16 + 5], seed=9)[0]
    batch = [shared + t for t in random_prompts([1, 4, 20, 33], seed=10)]
    plain = LLM(path, dtype="float32", device="cpu", kv_cache_dtype="int8", enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in plain.generate(batch, GREEDY, use_tqdm=False)]
    cached = LLM(path, dtype="float32", device="cpu", kv_cache_dtype="int8")
    cached.generate(batch[:1], GREEDY, use_tqdm=False)
    outs = cached.generate(batch, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert all(o.num_cached_tokens >= 48 for o in outs)
