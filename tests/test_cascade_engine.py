"""Shared-prefix attention on and off give the same greedy tokens and float32 logits within 1e-5: groups
of 1..64 sequences sharing a cached prefix mixed with sequences sharing nothing, n > 1, preemption and
speculative rows, on the C kernel path (the one-call C decode step) and on the portable torch path."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.layers import cascade


@pytest.fixture(autouse=True)
def group_small_shares(monkeypatch):
    """Form groups from 2 rows sharing 2 blocks on: the minimum where grouping pays is a speed
    threshold (fuselm/layers/cascade.py), correctness must hold for every group."""
    monkeypatch.setattr(cascade, "MIN_GROUP_ROWS", 2)
    monkeypatch.setattr(cascade, "MIN_SHARED_BLOCKS", 2)
    monkeypatch.setattr(cascade, "MIN_GROUP_BLOCK_READS", 0)
    monkeypatch.setattr(cascade, "CHUNK_QUERY_ROWS_MIN_BLOCKS", 2)


def run(path: str, prompts, params: SamplingParams, cascade: bool, warm: list | None = None, dtype: str = "float32",
        **options):
    """(token ids per output, every step's logits, KV token reads saved, preemptions) of one engine."""
    llm = LLM(path, dtype=dtype, device="cpu", enable_cascade_attention=cascade, **options)
    runner = llm.engine.runner
    if warm:  # compute the shared prefixes once, so the batch finds them in the prefix cache
        llm.generate(warm, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    logits = []
    compute = runner.model.compute_logits

    def recording(hidden):
        out = compute(hidden)
        logits.append(out.detach().clone())
        return out

    runner.model.compute_logits = recording
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.kv.num_free_blocks == runner.num_blocks  # every block back in the pool
    return ([c.token_ids for o in outs for c in o.outputs], logits, runner.cascade_kv_tokens_saved,
            llm.engine.scheduler.num_preemptions)


def assert_same(on, off) -> None:
    assert on[0] == off[0]
    assert len(on[1]) == len(off[1])
    for a, b in zip(on[1], off[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert on[2] > 0 and off[2] == 0


def shared_prefix_batch(sizes: list[int], prefix_blocks: int, loners: int, seed: int):
    """Groups of `sizes` prompts, each group with its own prefix of `prefix_blocks` 16-token blocks plus
    a few tokens, each prompt with its own tail; and `loners` unrelated prompts."""
    prefixes = random_prompts([16 * prefix_blocks + 3] * len(sizes), seed=seed)
    prompts = []
    for g, size in enumerate(sizes):
        for tail in random_prompts([1 + (i * 7) % 23 for i in range(size)], seed=seed + 100 + g):
            prompts.append(prefixes[g] + tail)
    prompts += random_prompts([5 + 11 * i for i in range(loners)], seed=seed + 1)
    return prompts, prefixes


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_groups_with_loners_match(tiny_llama, cpu_kernels):
    prompts, prefixes = shared_prefix_batch([1, 2, 7, 20], prefix_blocks=5, loners=3, seed=1)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = [run(tiny_llama[0], prompts, params, cascade, warm=prefixes, cpu_kernels=cpu_kernels)
               for cascade in (True, False)]
    assert_same(*results)


def test_sixty_four_rows_sharing_a_long_prefix(tiny_llama):
    prompts, prefixes = shared_prefix_batch([64], prefix_blocks=12, loners=2, seed=2)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert_same(*(run(tiny_llama[0], prompts, params, cascade, warm=prefixes) for cascade in (True, False)))


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_n_samples_and_preemption(tiny_llama, cpu_kernels):
    """n > 1 shares the prompt's blocks by reference; a pool too small for all forces preemption."""
    prompts = random_prompts([70, 45, 90], seed=3)
    params = SamplingParams(temperature=0, max_tokens=20, n=6, ignore_eos=True)
    probe = LLM(tiny_llama[0], dtype="float32", device="cpu")
    small = 40 * probe.engine.runner.bytes_per_block  # 640 tokens for 18 sequences of ~90-110
    results = [run(tiny_llama[0], prompts, params, cascade, cpu_kernels=cpu_kernels, kv_cache_memory_bytes=small,
                   max_num_batched_tokens=64) for cascade in (True, False)]
    assert_same(*results)
    assert results[0][3] > 0 and results[1][3] > 0


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_speculative_rows(tiny_llama, cpu_kernels):
    """ngram guesses make several query rows per sequence; they share the sequence's blocks too."""
    base = random_prompts([40], seed=4)[0]
    prefix = (base * 3)[:16 * 4 + 2]  # repetitive text: the ngram proposer finds guesses
    prompts = [prefix + base[i:i + 9] for i in range(0, 24, 3)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}
    results = [run(tiny_llama[0], prompts, params, cascade, warm=[prefix], cpu_kernels=cpu_kernels,
                   speculative_config=spec) for cascade in (True, False)]
    assert results[0][0] == results[1][0]
    assert results[0][2] > 0 and results[1][2] == 0


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_int8_kv_cache(tiny_llama, cpu_kernels):
    """An int8 KV cache: the shared-prefix kernel (paged_attention_int8.c's cache layout) and the torch path."""
    prompts, prefixes = shared_prefix_batch([3, 9], prefix_blocks=4, loners=2, seed=5)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    results = [run(tiny_llama[0], prompts, params, cascade, warm=prefixes, cpu_kernels=cpu_kernels,
                   kv_cache_dtype="int8") for cascade in (True, False)]
    assert_same(*results)


def test_bfloat16_model_stays_within_bfloat16_noise(tmp_path):
    """A bfloat16 model (head_dim 32: the C kernels' bf16 panels, P rounded to bf16) with peaked attention: the first
    step's logits (the prompt tails attending as grouped query rows over their cached prefixes; nothing sampled yet)
    of the C kernels with the option on and off stay as close to the torch path's bfloat16 logits as those are to
    the float32 model's."""
    from safetensors.torch import load_file, save_file

    from tiny_models import make_tiny_model

    make_tiny_model(tmp_path, "llama", hidden=128)  # 4 heads of 32
    weights = load_file(tmp_path / "model.safetensors")
    for name in weights:  # peaked attention that carries into the logits: errors in P V then show there
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weights[name] *= 16
        elif name.endswith(("v_proj.weight", "o_proj.weight")):
            weights[name] *= 8
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    prompts, prefixes = shared_prefix_batch([20, 7], prefix_blocks=6, loners=2, seed=6)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    runs = {name: run(str(tmp_path), prompts, params, cascade, warm=prefixes, dtype=dtype, cpu_kernels=c)
            for name, cascade, dtype, c in (("on", True, "bfloat16", True), ("off", False, "bfloat16", True),
                                            ("torch", False, "bfloat16", False), ("exact", False, "float32", False))}
    assert runs["on"][2] > 0 and runs["off"][2] == 0
    first = {name: r[1][0].float() for name, r in runs.items()}
    noise = (first["torch"] - first["exact"]).abs().max()
    for name in ("on", "off"):
        assert (first[name] - first["torch"]).abs().max() <= noise, name
