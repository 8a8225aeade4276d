"""KV compression (fuselm/kv_compression.py): StreamingLLM and SnapKV against HF transformers on the
same weights with the attention each method leaves (per-layer, per-head masks hooked into HF's
attention), output identical to no compression when the budget covers the sequence, blocks back to
the pool, compressed and uncompressed requests in one batch, the prefix cache kept clean, admission
by the compressed size, and bad settings refused (offline and with HTTP 400 from a real server)."""

from __future__ import annotations

import httpx
import pytest
import torch

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.errors import InvalidRequestError

BLOCK = 16


def greedy(max_tokens: int, compression: dict | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, kv_compression=compression)


def hf_greedy(hf, prompt: list[int], max_tokens: int, visible) -> list[int]:
    """Greedy tokens of the HF model, each layer's attention restricted by visible(L) -> per layer a bool
    [Hq, L, L] (query row, key) over the whole recomputed sequence of length L."""
    current: dict[str, list[torch.Tensor]] = {}

    def hook(index):
        def pre(module, args, kwargs):
            kwargs["attention_mask"] = current["masks"][index]
            return args, kwargs
        return pre

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(hf.model.layers)]
    ids = list(prompt)
    try:
        for _ in range(max_tokens):
            length = len(ids)
            current["masks"] = [torch.zeros(v.shape).masked_fill_(~v, float("-inf")).unsqueeze(0) for v in visible(length)]
            with torch.no_grad():
                logits = hf(torch.tensor([ids]), position_ids=torch.arange(length).unsqueeze(0)).logits
            ids.append(int(logits[0, -1].argmax()))
    finally:
        for handle in handles:
            handle.remove()
    return ids[len(prompt):]


def causal(length: int) -> torch.Tensor:
    return torch.arange(length).unsqueeze(0) <= torch.arange(length).unsqueeze(1)  # [L, L]


@pytest.mark.parametrize("chunk", [256, 32])
def test_streaming_matches_hf_with_sinks_and_window(tiny_llama, chunk):
    """The query at position t sees the sink blocks and the window left after block-granular
    eviction, positions from sink_blocks*16 + 16*floor((t - sink_blocks*16 - window) / 16) on,
    in the prompt (whole or chunked) as in the output."""
    path, hf = tiny_llama
    cfg = hf.config
    sink, window, prompt_len, steps = 4, 24, 90, 40
    prompt = random_prompts([prompt_len], seed=3)[0]
    sinks = -(-sink // BLOCK) * BLOCK

    def visible(length):
        t = torch.arange(length).unsqueeze(1)
        k = torch.arange(length).unsqueeze(0)
        evicted = BLOCK * torch.div(t - sinks - window, BLOCK, rounding_mode="floor").clamp_min(0)
        vis = causal(length) & ((k < sinks) | (k >= sinks + evicted))
        return [vis.expand(cfg.num_attention_heads, length, length)] * cfg.num_hidden_layers

    want = hf_greedy(hf, prompt, steps, visible)
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=chunk)
    got = llm.generate([prompt], greedy(steps, {"method": "streaming", "sink": sink, "window": window}), use_tqdm=False)
    assert got[0].outputs[0].token_ids == want
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks


def snapkv_kept(hf, prompt: list[int], budget: int, window: int, pool: int) -> list[list[set[int]]]:
    """The positions SnapKV keeps per layer and KV head, from HF's own attention probabilities."""
    cfg = hf.config
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = hf(torch.tensor([prompt]), output_attentions=True).attentions
    finally:
        hf.set_attn_implementation("sdpa")
    length = len(prompt)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    kept = []
    for probs in attentions:  # [1, Hq, L, L]
        votes = probs[0, :, length - window:, :].sum(1).view(cfg.num_key_value_heads, group, length).sum(1)  # [Hkv, L]
        layer = []
        for head in votes.tolist():
            older = head[:length - window]
            pooled = [max(older[max(0, i - pool // 2):i + pool // 2 + 1]) for i in range(len(older))]
            best = sorted(range(len(older)), key=lambda i: -pooled[i])[:budget - window]
            layer.append(set(best) | set(range(length - window, length)))
        kept.append(layer)
    return kept


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_snapkv_matches_hf_restricted_to_the_kept_positions(tiny_llama, kv_dtype):
    path, hf = tiny_llama
    cfg = hf.config
    budget, window, pool, prompt_len, steps = 24, 8, 3, 70, 12
    prompt = random_prompts([prompt_len], seed=4)[0]
    kept = snapkv_kept(hf, prompt, budget, window, pool)
    group = cfg.num_attention_heads // cfg.num_key_value_heads

    def visible(length):
        masks = []
        for layer in kept:
            vis = causal(length).repeat(cfg.num_attention_heads, 1, 1)  # [Hq, L, L]
            for h in range(cfg.num_attention_heads):
                keep = torch.zeros(length, dtype=torch.bool)
                keep[sorted(layer[h // group])] = True
                keep[prompt_len:] = True
                vis[h, prompt_len:] &= keep
            masks.append(vis)
        return masks

    settings = {"method": "snapkv", "budget": budget, "window": window, "pool": pool}
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=256, kv_cache_dtype=kv_dtype)
    got = llm.generate([prompt], greedy(steps, settings), use_tqdm=False)[0].outputs[0].token_ids
    if kv_dtype == "float32":
        assert got == hf_greedy(hf, prompt, steps, visible)
    else:  # int8 K/V: the same tokens as the float32 cache compressed alike, on this small model
        plain = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=256)
        assert got == plain.generate([prompt], greedy(steps, settings), use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_budget_covering_the_sequence_changes_nothing(tiny_llama, cpu_kernels):
    path, _ = tiny_llama
    prompts = random_prompts([5, 40, 90, 130], seed=6)
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64, cpu_kernels=cpu_kernels)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(20), use_tqdm=False)]
    for settings in ({"method": "snapkv", "budget": 130, "window": 16}, {"method": "streaming", "sink": 4, "window": 140}):
        outs = llm.generate(prompts, greedy(20, settings), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want, settings
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks


def test_compressed_and_uncompressed_requests_in_one_batch(tiny_llama):
    """Each request's output in a mixed batch (chunked prompts, C kernels) is what it gives alone."""
    path, _ = tiny_llama
    prompts = random_prompts([120, 150, 100, 140], seed=7)
    settings = [{"method": "snapkv", "budget": 48, "window": 8}, None, {"method": "streaming", "sink": 4, "window": 32},
                None]
    params = [greedy(24, s) for s in settings]
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=96, enable_prefix_caching=False)
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    together = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks


def test_eviction_returns_blocks_to_the_pool(tiny_llama):
    path, _ = tiny_llama
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=512)
    engine = llm.engine
    total = engine.runner.num_blocks
    engine.add_request("snap", random_prompts([200], seed=8)[0], greedy(5, {"method": "snapkv", "budget": 40}))
    engine.step()  # the whole prompt, then compaction
    req = engine.scheduler.running[0]
    assert len(req.block_ids) == -(-40 // BLOCK) and total - engine.kv.num_free_blocks == len(req.block_ids)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.num_free_blocks == total

    engine.add_request("stream", random_prompts([20], seed=9)[0], greedy(300, {"method": "streaming", "sink": 4,
                                                                               "window": 48}))
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        held.extend(len(r.block_ids) for r in engine.scheduler.running)
    assert max(held) <= 1 + -(-48 // BLOCK) + 1  # sink block + window + the block being filled
    assert engine.kv.num_free_blocks == total


def test_scheduler_admits_by_the_compressed_size(tiny_llama):
    """In a pool of 24 blocks, 4 long streaming requests run side by side; uncompressed they cannot."""
    path, _ = tiny_llama
    per_block = LLM(path, dtype="float32", device="cpu").engine.runner.bytes_per_block
    prompts = random_prompts([300] * 4, seed=10)

    def most_running(settings):
        llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory_bytes=24 * per_block, max_num_batched_tokens=64)
        engine = llm.engine
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, greedy(40, settings))
        most = 0
        while engine.has_unfinished_requests():
            engine.step()
            most = max(most, engine.num_running)
        assert engine.kv.num_free_blocks == engine.runner.num_blocks
        return most, engine.scheduler.num_preemptions

    compressed, compressed_preemptions = most_running({"method": "streaming", "sink": 4, "window": 32})
    full, _ = most_running(None)
    assert compressed == 4 and compressed_preemptions == 0
    assert full < 4


def test_compressed_requests_keep_the_prefix_cache_clean(tiny_llama):
    path, _ = tiny_llama
    prompt = random_prompts([100], seed=11)[0]
    snap = greedy(10, {"method": "snapkv", "budget": 32})
    llm = LLM(path, dtype="float32", device="cpu")
    compressed = llm.generate([prompt], snap, use_tqdm=False)[0]
    first = llm.generate([prompt], greedy(10), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0  # the compressed request registered nothing
    second = llm.generate([prompt], greedy(10), use_tqdm=False)[0]
    assert second.num_cached_tokens >= 96 and second.outputs[0].token_ids == first.outputs[0].token_ids
    again = llm.generate([prompt], snap, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == compressed.outputs[0].token_ids


@pytest.mark.parametrize("settings, param", [
    ("snapkv", "kv_compression"),
    ({"method": "lru", "budget": 8}, "kv_compression.method"),
    ({"method": "snapkv"}, "kv_compression.budget"),
    ({"method": "snapkv", "budget": 8, "window": 16}, "kv_compression.budget"),
    ({"method": "snapkv", "budget": 64, "pool": 4}, "kv_compression.pool"),
    ({"method": "streaming", "window": 0}, "kv_compression.window"),
    ({"method": "streaming", "window": 64, "sink": -1}, "kv_compression.sink"),
    ({"method": "streaming", "window": 64, "budget": 8}, "kv_compression.budget"),
    ({"method": "streaming", "window": True}, "kv_compression.window"),
])
def test_bad_settings_are_refused(settings, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(kv_compression=settings)
    assert info.value.param == param


def test_server_takes_kv_compression_and_answers_400_on_bad_values(server):
    body = {"model": "tiny-llama", "prompt": [5 + i % 300 for i in range(120)], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        plain = client.post("/v1/completions", json=body)
        covered = client.post("/v1/completions", json={**body, "kv_compression": {"method": "snapkv", "budget": 256}})
        squeezed = client.post("/v1/completions", json={**body, "kv_compression": {"method": "snapkv", "budget": 32}})
        bad = client.post("/v1/completions", json={**body, "kv_compression": {"method": "snapkv", "budget": 0}})
    assert plain.status_code == covered.status_code == squeezed.status_code == 200
    assert covered.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "kv_compression.budget"


def test_streaming_is_unchanged_by_preemption_and_speculation(tiny_llama):
    """StreamingLLM masks depend on positions only: recomputing after a preemption and verifying ngram
    guesses (rows of several tokens) give the greedy tokens of a plain run; SnapKV requests preempted
    and recomputed still finish and return their blocks."""
    path, _ = tiny_llama
    loop = random_prompts([12], seed=12)[0]
    prompts = [loop * 10, random_prompts([110], seed=13)[0], loop * 8 + [7, 8, 9]]
    streaming = greedy(40, {"method": "streaming", "sink": 4, "window": 32})
    plain = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, streaming, use_tqdm=False)]
    per_block = plain.engine.runner.bytes_per_block
    tight = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64, kv_cache_memory_bytes=10 * per_block)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, streaming, use_tqdm=False)] == want
    assert tight.engine.scheduler.num_preemptions > 0
    snap = [greedy(40, {"method": "snapkv", "budget": 40, "window": 8})] * len(prompts)
    assert all(len(o.outputs[0].token_ids) == 40 for o in tight.generate(prompts, snap, use_tqdm=False))
    assert tight.engine.kv.num_free_blocks == tight.engine.runner.num_blocks
    spec = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, streaming, use_tqdm=False)] == want
    assert spec.engine.kv.num_free_blocks == spec.engine.runner.num_blocks
