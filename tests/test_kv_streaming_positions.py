"""StreamingLLM with rotary positions in the cache (`"positions": "cache"`, runner/cache_positions.py)
against HF transformers decoding token by token with its own KV cache, evicted as the engine evicts
(whole blocks between the sink block and the window) and its window keys re-rotated with HF's own
rotary tables, each new token fed at its index in that cache. Also: unchanged output while nothing
is evicted, the same tokens on the portable path and the C kernels, and a bad value refused."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import rotate_half

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.errors import InvalidRequestError

BLOCK = 16


def greedy(max_tokens: int, compression: dict | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, kv_compression=compression, logprobs=0)


def hf_streaming_in_cache(hf, prompt: list[int], steps: int, sink: int, window: int):
    """(greedy tokens, their logprobs) of HF with a StreamingLLM cache: before each step the whole blocks after the sink
    blocks that lie before the last `window` entries leave the cache, the entries after them are
    rotated back by as many positions, and the new token takes the next cache index as position."""
    sink_tokens = -(-sink // BLOCK) * BLOCK
    cache = DynamicCache()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt]), cache=cache, use_cache=True).logits
    out = [int(logits[0, -1].argmax())]
    logprobs = [float(logits[0, -1].log_softmax(-1).max())]
    for _ in range(steps - 1):
        entries = cache.get_seq_length()
        surplus = (entries - sink_tokens - window) // BLOCK
        if surplus > 0:
            d = surplus * BLOCK
            cos, sin = hf.model.rotary_emb(torch.zeros(1), torch.tensor([[d]]))  # [1, 1, D]
            for layer in cache.layers:
                kept = layer.keys[:, :, sink_tokens + d:].double()
                back = kept * cos.double() - rotate_half(kept) * sin.double()  # rotated by -d
                layer.keys = torch.cat((layer.keys[:, :, :sink_tokens], back.to(layer.keys.dtype)), dim=2)
                layer.values = torch.cat((layer.values[:, :, :sink_tokens], layer.values[:, :, sink_tokens + d:]), dim=2)
            entries -= d
        with torch.no_grad():
            logits = hf(torch.tensor([[out[-1]]]), cache=cache, use_cache=True,
                        position_ids=torch.tensor([[entries]]), cache_position=torch.tensor([entries])).logits
        out.append(int(logits[0, -1].argmax()))
        logprobs.append(float(logits[0, -1].log_softmax(-1).max()))
    return out, logprobs


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_streaming_cache_positions_match_hf_with_rerotated_keys(tiny_llama, cpu_kernels):
    path, hf = tiny_llama
    sink, window, steps = 4, 24, 70
    prompt = random_prompts([30], seed=31)[0]
    settings = {"method": "streaming", "sink": sink, "window": window, "positions": "cache"}
    llm = LLM(path, dtype="float32", device="cpu", cpu_kernels=cpu_kernels)
    got = llm.generate([prompt], greedy(steps, settings), use_tqdm=False)[0].outputs[0]
    want, want_logprobs = hf_streaming_in_cache(hf, prompt, steps, sink, window)
    assert got.token_ids == want
    logprobs = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
    assert logprobs == pytest.approx(want_logprobs, abs=2e-5)  # tokens alone barely see a wrong rotation
    text = llm.generate([prompt], greedy(steps, {**settings, "positions": "text"}), use_tqdm=False)[0].outputs[0]
    assert text.token_ids != got.token_ids  # the sinks' distance changed what the model attended to
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks


def test_cache_positions_change_nothing_before_the_first_eviction(tiny_llama):
    path, _ = tiny_llama
    prompts = random_prompts([20, 35, 50], seed=32)
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=32)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(20), use_tqdm=False)]
    settings = {"method": "streaming", "sink": 4, "window": 80, "positions": "cache"}
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(20, settings), use_tqdm=False)] == want


def test_cache_positions_in_a_mixed_batch_and_int8(tiny_llama):
    """Cache-position streams next to plain and text-position requests give what they give alone;
    an int8 cache re-quantises the rotated keys and still frees every block."""
    path, _ = tiny_llama
    prompts = random_prompts([30, 60, 25], seed=33)
    params = [greedy(50, {"method": "streaming", "sink": 4, "window": 24, "positions": "cache"}), greedy(50),
              greedy(50, {"method": "streaming", "sink": 4, "window": 32})]
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64)
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == alone
    int8 = LLM(path, dtype="float32", device="cpu", kv_cache_dtype="int8")
    assert all(len(o.outputs[0].token_ids) == 50 for o in int8.generate(prompts, params, use_tqdm=False))
    assert int8.engine.kv.num_free_blocks == int8.engine.runner.num_blocks


def test_bad_positions_value_is_refused():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(kv_compression={"method": "streaming", "window": 64, "positions": "absolute"})
    assert info.value.param == "kv_compression.positions"
