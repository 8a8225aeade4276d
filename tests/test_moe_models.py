"""The MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) against HF transformers on the same tiny
random models: packed-batch logits on the C path and the torch path, greedy continuations under a
small token budget (heavy chunking), with prefix-cache hits, and with preemption."""

from __future__ import annotations

import pytest

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from moe_models import MOE_KINDS, make_tiny_moe
from test_model_vs_hf import packed_last_logits
from tiny_models import hf_greedy, hf_last_logits

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in cache:
            path = tmp_path_factory.mktemp(kind)
            cache[kind] = (str(path), make_tiny_moe(path, kind))
        return cache[kind]

    return get


def greedy_ids(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["c", "torch"])
@pytest.mark.parametrize("kind", MOE_KINDS)
def test_packed_logits_match_hf(tiny_moe, kind, cpu_kernels):
    path, hf = tiny_moe(kind)
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=4096, cpu_kernels=cpu_kernels)
    want = "c-grouped-float32" if cpu_kernels else "torch-grouped-float32"
    assert llm.engine.runner.plan.linear["experts"] == want
    prompts = random_prompts([1, 5, 16, 17, 64, 130], seed=1)
    ours = packed_last_logits(llm, prompts)
    assert (ours - hf_last_logits(hf, prompts)).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_greedy_under_heavy_chunking_matches_hf(tiny_moe, kind):
    path, hf = tiny_moe(kind)
    prompts = random_prompts([1, 9, 40, 75], seed=2)
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=16)
    assert greedy_ids(llm, prompts) == [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_prefix_cache_hits_match_hf(tiny_moe, kind):
    path, hf = tiny_moe(kind)
    shared = random_prompts([3 * 16 + 5], seed=9)[0]  # a 3-block prefix plus a bit
    batch = [shared + t for t in random_prompts([1, 4, 20], seed=10)]
    llm = LLM(path, dtype="float32", device="cpu", enable_prefix_caching=True, max_num_batched_tokens=32)
    greedy_ids(llm, batch[:1])
    outs = llm.generate(batch, GREEDY, use_tqdm=False)  # every prompt now shares the cached prefix
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in batch]
    assert all(o.num_cached_tokens >= 3 * 16 for o in outs)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_preemption_matches_hf(tiny_moe, kind):
    path, hf = tiny_moe(kind)
    prompts = random_prompts([30, 45, 60, 70, 50, 35], seed=11)
    probe = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64)
    per_block = probe.engine.runner.bytes_per_block
    # 16 blocks = 256 tokens for 6 requests that need ~ 360 together: preemption is forced.
    small = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64, kv_cache_memory_bytes=16 * per_block)
    assert greedy_ids(small, prompts) == [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
    assert small.engine.scheduler.num_preemptions > 0
