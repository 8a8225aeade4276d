"""Checks every model family runs against HF transformers on the same tiny random weights: one
packed step's logits, greedy output under heavy chunking, with prefix-cache hits and with forced
preemption. Test files of a family (test_qwen3.py, test_gemma3.py, ...) call them with their model."""

from __future__ import annotations

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from test_model_vs_hf import packed_last_logits
from tiny_models import hf_greedy, hf_last_logits

GREEDY_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def assert_pool_full(llm: LLM) -> None:
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks


def check_packed_logits(path: str, hf, lengths: list[int], **options) -> float:
    """All prompts in one packed step; returns the largest logit difference from HF (asserted < 1e-4)."""
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=4096, **options)
    prompts = random_prompts(lengths, seed=1)
    diff = (packed_last_logits(llm, prompts) - hf_last_logits(hf, prompts)).abs().max().item()
    assert diff < 1e-4, diff
    return diff


def check_greedy(path: str, hf, lengths: list[int], **options) -> None:
    llm = LLM(path, dtype="float32", device="cpu", **options)
    prompts = random_prompts(lengths, seed=2)
    assert greedy(llm, prompts) == [hf_greedy(hf, p, GREEDY_TOKENS) for p in prompts]
    assert_pool_full(llm)


def check_prefix_cache_hits(path: str, hf, prefix_blocks: int = 4, **options) -> None:
    """A shared prefix of `prefix_blocks` 16-token blocks is computed once and hit by every later request."""
    shared = random_prompts([prefix_blocks * 16 + 3], seed=9)[0]
    batch = [shared + tail for tail in random_prompts([1, 6, 21, 40], seed=10)]
    expected = [hf_greedy(hf, p, GREEDY_TOKENS) for p in batch]
    llm = LLM(path, dtype="float32", device="cpu", enable_prefix_caching=True, max_num_batched_tokens=64, **options)
    assert greedy(llm, batch[:1]) == expected[:1]
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.num_cached_tokens >= prefix_blocks * 16 for o in outs)
    assert_pool_full(llm)


def check_preemption(path: str, hf, blocks: int = 20, **options) -> None:
    """A pool of 20 blocks (320 tokens) for requests needing ~900 together: preemption is forced.
    (A model whose every layer is windowed needs fewer: `blocks`.)"""
    prompts = random_prompts([90, 17, 60, 33, 120, 5, 75, 48], seed=3)
    probe = LLM(path, dtype="float32", device="cpu", kv_cache_memory_bytes=8 << 20, **options)
    per_block = probe.engine.runner.bytes_per_block
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64, kv_cache_memory_bytes=blocks * per_block,
              **options)
    assert greedy(llm, prompts) == [hf_greedy(hf, p, GREEDY_TOKENS) for p in prompts]
    assert llm.engine.scheduler.num_preemptions > 0
    assert_pool_full(llm)
