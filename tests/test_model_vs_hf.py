"""fuselm against HF transformers on the same weights: packed-batch logits and greedy continuations."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_KINDS, random_prompts
from fuselm import LLM, SamplingParams
from tiny_models import hf_greedy, hf_last_logits

LENGTHS = [1, 5, 16, 17, 40, 64, 128, 200]


def packed_last_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """Run all prompts as ONE packed step through the real scheduler + runner; last-token logits."""
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"logits-{i}", p, SamplingParams(max_tokens=1))
    out = engine.scheduler.schedule()
    assert len(out.scheduled) == len(prompts), "all prompts must fit in one step for this test"
    last = engine.runner.last_token_logits(out)  # rows in scheduled order
    row_of = {row.request_id: j for j, row in enumerate(out.scheduled)}
    logits = last[[row_of[f"logits-{i}"] for i in range(len(prompts))]]
    for i in range(len(prompts)):
        engine.abort_request(f"logits-{i}")
    assert engine.kv.num_free_blocks == engine.runner.num_blocks
    return logits


@pytest.mark.parametrize("name", sorted(TINY_KINDS))
def test_packed_logits_match_hf(tiny_model_factory, name):
    path, hf = tiny_model_factory(name)
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=4096)
    prompts = random_prompts(LENGTHS, seed=1)
    ours = packed_last_logits(llm, prompts)
    ref = hf_last_logits(hf, prompts)
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", sorted(TINY_KINDS))
def test_greedy_matches_hf(tiny_model_factory, name):
    path, hf = tiny_model_factory(name)
    llm = LLM(path, dtype="float32", device="cpu")
    prompts = random_prompts(LENGTHS, seed=2)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 32)


def test_bf16_close_to_hf(tiny_llama):
    """bfloat16 is not exact, but its logits must stay close to the fp32 reference."""
    path, hf = tiny_llama
    llm = LLM(path, dtype="bfloat16", device="cpu")
    prompts = random_prompts([3, 50, 120], seed=3)
    ours = packed_last_logits(llm, prompts)
    ref = hf_last_logits(hf, prompts)
    assert (ours - ref).abs().max().item() < 0.1


@pytest.mark.parametrize("name", ["llama_untied", "llama_tied", "qwen2_bias"])
def test_gguf_written_from_hf_matches_hf(tiny_model_factory, name, tmp_path):
    """A GGUF written from an HF model the way llama.cpp converts it loads and computes like HF."""
    from gguf_writer import write_gguf_from_hf

    path, hf = tiny_model_factory(name)
    gguf_path = write_gguf_from_hf(hf, path, tmp_path / "tiny.gguf")
    llm = LLM(str(gguf_path), dtype="float32", device="cpu")
    prompts = random_prompts([1, 17, 90], seed=4)
    assert (packed_last_logits(llm, prompts) - hf_last_logits(hf, prompts)).abs().max().item() < 1e-4
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 16) for p in prompts]


def test_embedded_model_knows_paris(embedded_llm):
    out = embedded_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                            SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")
