"""KV cache groups (core/kv_groups.py): sliding-window layers keep only the blocks their window
reaches. Against HF transformers on tiny random models with a 24-token window and prompts several
windows long: Gemma 3 (interleaved full and sliding layers: 4 groups), Qwen2 with
max_window_layers (2 full + 2 sliding layers: 2 groups) and Mistral (every layer windowed: one
windowed group). Logits, greedy output under heavy chunking, prefix-cache hits (including hits over
window blocks already released), preemption and n > 1; the windowed blocks a sequence holds stay
bounded while it generates, and every block returns to the pool."""

from __future__ import annotations

import pytest
import torch

import family_checks as checks
from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.core.kv_groups import GroupedKVCacheManager, KVCacheGroup, blocks_for_tokens, kv_cache_groups
from fuselm.core.request import Request
from tiny_models import hf_greedy, make_tiny_model, save_tokenizer

WINDOW = 24
LONG = [150, 97, 5, 61]  # several windows long, and shorter than one


def _save(path, config, cls):
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    save_tokenizer(path)
    torch.manual_seed(1)  # seed 0's Mistral takes EOS (which HF suppresses under min_new_tokens) as argmax
    model = getattr(transformers, cls)(config)
    model.save_pretrained(path, safe_serialization=True)
    return model.float().eval()


def _common():
    return dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=4,
                rms_norm_eps=1e-5)


@pytest.fixture(scope="module", params=["gemma3", "qwen2", "mistral"])
def windowed(request, tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp(request.param)
    if request.param == "gemma3":
        hf = make_tiny_model(path, "gemma3", tie=True)
    elif request.param == "qwen2":
        config = transformers.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                                          **_common())
        assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
        hf = _save(path, config, "Qwen2ForCausalLM")
    else:
        hf = _save(path, transformers.MistralConfig(sliding_window=WINDOW, **_common()), "MistralForCausalLM")
    return str(path), hf


def test_groups_of_equal_size():
    gemma_270m = ["s"] * 5 + ["f"] + ["s"] * 5 + ["f"] + ["s"] * 5 + ["f"]
    groups = kv_cache_groups([None if kind == "f" else 512 for kind in gemma_270m])
    assert [g.window for g in groups] == [None] + [512] * 5
    assert groups[0].layers == (5, 11, 17) and groups[1].layers == (0, 1, 2)
    assert sorted(i for g in groups for i in g.layers) == list(range(18))
    assert kv_cache_groups([8, 8, 8]) == [KVCacheGroup(8, (0, 1, 2))]
    assert len(kv_cache_groups([8, None, 8, 8])) == 4


def _request(tokens: list[int]) -> Request:
    return Request("r", None, tokens, SamplingParams(max_tokens=4), 4, arrival_seq=0)


def test_prefix_hit_needs_the_window_blocks():
    """A hit of L tokens needs every full block before L and the windowed blocks covering [L - W + 1, L):
    released-but-cached window blocks still serve a hit; evicted ones shorten it."""
    bs, window = 16, 32
    kv = GroupedKVCacheManager(64, bs, True, [KVCacheGroup(None, (0,)), KVCacheGroup(window, (1,))])
    prompt = random_prompts([160], seed=5)[0]
    first = _request(prompt)
    assert kv.allocate_slots(first, 160)
    first.num_computed_tokens = 160
    kv.cache_full_blocks(first)
    first.append_token(7)
    assert kv.allocate_slots(first, 1)  # the next query is at 160: windowed blocks 0..7 are released
    assert kv.held_blocks(first) == [11, 3]
    assert first.group_block_ids[0][:8] == [kv.null_block] * 8

    again = _request(prompt + [9, 9, 9])
    assert len(kv.find_cached_prefix(again)) == 10  # released blocks are still cached

    kv.pool.release(kv.pool.allocate(kv.pool.num_free))  # evicts every cached block nobody holds
    shorter = _request(prompt[:100] + [11] * 20)
    assert kv.find_cached_prefix(shorter) == []  # its window blocks (4, 5) are gone, and so on down
    whole = _request(prompt + [9, 9, 9])
    hit = kv.find_cached_prefix(whole)
    assert len(hit) == 10 and hit.tables[1][8:] == first.group_block_ids[0][8:10]
    assert kv.allocate_slots(whole, 4, hit)
    assert kv.held_blocks(whole) == [11, 3] and whole.num_computed_tokens == 160
    kv.free(first)
    kv.free(whole)
    assert kv.num_free_blocks == 64


def test_packed_logits_match_hf(windowed):
    for cpu_kernels in (True, False):
        checks.check_packed_logits(*windowed, LONG, cpu_kernels=cpu_kernels)


@pytest.mark.parametrize("budget", [7, 40])
def test_greedy_matches_hf_chunked(windowed, budget):
    checks.check_greedy(*windowed, LONG, max_num_batched_tokens=budget)


def test_prefix_cache_hits_past_the_window(windowed):
    """A shared prefix of 8 blocks (128 tokens, over 5 windows): the first request has released its
    early window blocks by the time the others look it up."""
    checks.check_prefix_cache_hits(*windowed, prefix_blocks=8)


def test_preemption_matches_hf(windowed):
    all_windowed = type(windowed[1]).__name__ == "MistralForCausalLM"  # holds ~3 blocks per decoding sequence
    checks.check_preemption(*windowed, blocks=10 if all_windowed else 20)


def test_n_samples_share_the_prompt(windowed):
    path, hf = windowed
    prompt = random_prompts([130], seed=12)[0]
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=32)
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=30, min_tokens=30), use_tqdm=False)
    expected = hf_greedy(hf, prompt, 30)
    assert [c.token_ids for c in out[0].outputs] == [expected] * 3
    checks.assert_pool_full(llm)


def test_window_blocks_stay_bounded_while_generating(windowed):
    path, hf = windowed
    prompt = random_prompts([70], seed=13)[0]
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=16)
    engine = llm.engine
    groups = engine.runner.kv_groups
    assert any(g.window == WINDOW for g in groups)
    engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=110, min_tokens=110))
    bound = [blocks_for_tokens(g, 10 ** 6, 16, engine.kv.block_size) for g in groups]
    assert all(b < (70 + 110) // 16 for b, g in zip(bound, groups) if g.window)  # the bound says something
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out if out.finished else final
        for req in engine.scheduler.running:
            held = engine.kv.held_blocks(req)
            assert all(h <= b for h, b in zip(held, bound)), (held, bound)
            full = -(-req.num_computed_tokens // 16)  # a full-attention group holds every computed block
            assert all(h == full for h, g in zip(held, groups) if g.window is None)
    assert final.outputs[0].token_ids == hf_greedy(hf, prompt, 110)
    checks.assert_pool_full(llm)
