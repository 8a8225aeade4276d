"""H2O KV compression (fuselm/kv_compression.py, layers/h2o_scores.py, runner/h2o_compaction.py)
against HF transformers on the same weights: the reference accumulates HF's own attention
probabilities (float64 sums, per layer and KV head) and applies H2O's rule itself, then runs each
step with per-head masks leaving exactly the positions H2O holds. Also: output identical to no
compression when the budget covers the sequence, blocks back to the pool, H2O and uncompressed
requests in one batch, and bad settings refused."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.errors import InvalidRequestError

BLOCK = 16


def greedy(max_tokens: int, compression: dict | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, kv_compression=compression)


def hf_h2o_greedy(hf, prompt: list[int], steps: int, budget: int, recent: int) -> list[int]:
    """Greedy tokens of the HF model under H2O: after a step that leaves budget + recent + BLOCK held
    positions or more, each layer and KV head keeps its last `recent` held positions and the `budget`
    others with the most accumulated attention (ties: the earlier position)."""
    cfg = hf.config
    heads, kv_heads, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    group = heads // kv_heads
    keep = budget + recent
    held = [[list(range(len(prompt))) for _ in range(kv_heads)] for _ in range(layers)]  # positions, ascending
    sums = [torch.zeros(kv_heads, len(prompt) + steps, dtype=torch.float64) for _ in range(layers)]
    row_masks: list[list[torch.Tensor]] = []  # per decode row: per layer [Hq, positions] bool, as it was computed
    current: dict[str, list[torch.Tensor]] = {}

    def hook(index):
        def pre(module, args, kwargs):
            kwargs["attention_mask"] = current["masks"][index]
            return args, kwargs
        return pre

    hf.set_attn_implementation("eager")
    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(hf.model.layers)]
    ids = list(prompt)
    try:
        for step in range(steps):
            length = len(ids)
            causal = torch.arange(length).unsqueeze(0) <= torch.arange(length).unsqueeze(1)  # [L, L]
            if step:  # the new row sees what each head holds, and itself
                row = []
                for layer in held:
                    vis = torch.zeros(heads, length, dtype=torch.bool)
                    for h in range(heads):
                        vis[h, layer[h // group]] = True
                    vis[:, length - 1] = True
                    row.append(vis)
                row_masks.append(row)
            masks = []
            for index in range(layers):
                vis = causal.repeat(heads, 1, 1)  # [Hq, L, L]
                for j, row in enumerate(row_masks):
                    vis[:, len(prompt) + j, :len(prompt) + j + 1] = row[index][:, :len(prompt) + j + 1]
                masks.append(torch.zeros(vis.shape).masked_fill_(~vis, float("-inf")).unsqueeze(0))
            current["masks"] = masks
            with torch.no_grad():
                result = hf(torch.tensor([ids]), position_ids=torch.arange(length).unsqueeze(0), output_attentions=True)
            ids.append(int(result.logits[0, -1].argmax()))
            queries = slice(0, length) if step == 0 else slice(length - 1, length)
            for index, probs in enumerate(result.attentions):  # [1, Hq, L, L]
                added = probs[0, :, queries, :].double().sum(1).view(kv_heads, group, length).sum(1)  # [Hkv, L]
                sums[index][:, :length] += added
                for kvh in range(kv_heads):
                    if step:
                        held[index][kvh].append(length - 1)
                    positions = held[index][kvh]
                    if len(positions) >= keep + BLOCK:
                        older, last = positions[:-recent], positions[-recent:]
                        best = sorted(older, key=lambda p: (-float(sums[index][kvh, p]), p))[:budget]
                        held[index][kvh] = sorted(best) + last
    finally:
        for handle in handles:
            handle.remove()
        hf.set_attn_implementation("sdpa")
    return ids[len(prompt):]


@pytest.mark.parametrize("chunk, kv_dtype", [(256, "float32"), (32, "float32"), (256, "int8")])
def test_h2o_matches_hf_keeping_heavy_hitters_and_recent(tiny_llama, chunk, kv_dtype):
    path, hf = tiny_llama
    budget, recent, prompt_len, steps = 16, 8, 70, 40
    prompt = random_prompts([prompt_len], seed=21)[0]
    settings = {"method": "h2o", "budget": budget, "recent": recent}
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=chunk, kv_cache_dtype=kv_dtype)
    got = llm.generate([prompt], greedy(steps, settings), use_tqdm=False)[0].outputs[0].token_ids
    if kv_dtype == "float32":
        assert got == hf_h2o_greedy(hf, prompt, steps, budget, recent)
    else:  # int8 K/V: the same tokens as the float32 cache compressed alike, on this small model
        plain = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=chunk)
        assert got == plain.generate([prompt], greedy(steps, settings), use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_h2o_budget_covering_the_sequence_changes_nothing(tiny_llama, cpu_kernels):
    path, _ = tiny_llama
    prompts = random_prompts([5, 40, 90, 130], seed=22)
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64, cpu_kernels=cpu_kernels)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(20), use_tqdm=False)]
    outs = llm.generate(prompts, greedy(20, {"method": "h2o", "budget": 120, "recent": 16}), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks


def test_h2o_and_uncompressed_requests_in_one_batch(tiny_llama):
    """Each request's output in a mixed batch (chunked prompts, C kernels) is what it gives alone."""
    path, _ = tiny_llama
    prompts = random_prompts([120, 150, 100, 140], seed=23)
    settings = [{"method": "h2o", "budget": 32, "recent": 16}, None, {"method": "h2o", "budget": 24, "recent": 8},
                {"method": "snapkv", "budget": 48, "window": 8}]
    params = [greedy(30, s) for s in settings]
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=96, enable_prefix_caching=False)
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    together = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks


def test_h2o_returns_blocks_to_the_pool_as_it_decodes(tiny_llama):
    path, _ = tiny_llama
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=512)
    engine = llm.engine
    total = engine.runner.num_blocks
    engine.add_request("h2o", random_prompts([200], seed=24)[0], greedy(120, {"method": "h2o", "budget": 24,
                                                                              "recent": 16}))
    engine.step()  # the whole prompt, then compaction to 40 entries
    req = engine.scheduler.running[0]
    assert len(req.block_ids) == -(-40 // BLOCK) and total - engine.kv.num_free_blocks == len(req.block_ids)
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        held.extend(len(r.block_ids) for r in engine.scheduler.running)
    assert max(held) <= -(-(40 + BLOCK) // BLOCK)  # budget + recent + the block being filled
    assert engine.kv.num_free_blocks == total
    llm.generate([[5, 6, 7]], greedy(2), use_tqdm=False)  # the next step tells the runner the sequence finished
    assert not engine.runner.h2o_scores.sums


def test_h2o_recomputes_after_preemption(tiny_llama):
    """Preempted H2O requests start again from scratch: the same tokens as with room for all."""
    path, _ = tiny_llama
    prompts = random_prompts([100, 110, 90], seed=25)
    params = greedy(60, {"method": "h2o", "budget": 24, "recent": 8})
    roomy = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    per_block = roomy.engine.runner.bytes_per_block
    tight = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64, kv_cache_memory_bytes=11 * per_block)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)] == want
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.kv.num_free_blocks == tight.engine.runner.num_blocks


@pytest.mark.parametrize("settings, param", [
    ({"method": "h2o", "recent": 8}, "kv_compression.budget"),
    ({"method": "h2o", "budget": 8}, "kv_compression.recent"),
    ({"method": "h2o", "budget": 0, "recent": 8}, "kv_compression.budget"),
    ({"method": "h2o", "budget": 8, "recent": "8"}, "kv_compression.recent"),
    ({"method": "h2o", "budget": 8, "recent": 8, "window": 4}, "kv_compression.window"),
])
def test_bad_h2o_settings_are_refused(settings, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(kv_compression=settings)
    assert info.value.param == param
