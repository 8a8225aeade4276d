"""Scoring a prompt: completions with `echo` (and `max_tokens: 0`, as older evaluation harnesses send it)
over a real socket, and `max_tokens=0` offline.

References: HF transformers' log-softmax over the prompt (the tiny Llama's own HF model), and the
offline LLM's prompt logprobs computed the ordinary way (a request that also samples a token).
A prompt-only request samples nothing, reports finish_reason "length" and 0 completion tokens, and
gives every KV block back.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from fuselm import LLM, SamplingParams
from server_helpers import MODEL, wait_until

PROMPTS = ["The quick brown fox jumps over", "Paris is the capital of France and"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(tiny_llama[0], dtype="float32", device="cpu")


def hf_prompt_logprobs(hf_model, ids: list[int]) -> list[float]:
    """log p(token i | tokens < i) for i >= 1, from HF transformers."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()  # [P, V]
    logp = torch.log_softmax(logits[:-1], dim=-1)  # [P - 1, V]
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def pool_is_full(engine) -> bool:
    e = engine.engine
    return e.kv.num_free_blocks == e.runner.num_blocks and not e.has_unfinished_requests()


def test_offline_max_tokens_zero_returns_prompt_logprobs_only(offline, tiny_llama):
    scored = offline.generate(PROMPTS, SamplingParams(max_tokens=0, prompt_logprobs=2), use_tqdm=False)
    sampled = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2),
                               use_tqdm=False)
    for out, ref in zip(scored, sampled):
        assert out.outputs[0].text == "" and out.outputs[0].token_ids == []
        assert out.outputs[0].finish_reason == "length"
        assert out.prompt_logprobs[0] is None and ref.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
        for tid, a, b in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert a[tid].logprob == pytest.approx(b[tid].logprob, abs=1e-5)
            assert a[tid].rank == b[tid].rank
        hf = hf_prompt_logprobs(tiny_llama[1], out.prompt_token_ids)
        ours = [e[t].logprob for t, e in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
        assert ours == pytest.approx(hf, abs=1e-4)
    engine = offline.engine
    assert engine.kv.num_free_blocks == engine.runner.num_blocks


def test_offline_max_tokens_zero_without_logprobs_and_with_n(offline):
    outs = offline.generate(PROMPTS, SamplingParams(max_tokens=0, n=3, temperature=1.0), use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[[], [], []]] * 2
    assert all(c.finish_reason == "length" for o in outs for c in o.outputs)
    assert offline.engine.kv.num_free_blocks == offline.engine.runner.num_blocks


@pytest.mark.parametrize("bad", [-1, -5])
def test_negative_max_tokens_refused(bad):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=bad)


def test_echo_max_tokens_zero_scores_the_prompt(client, engine, offline, tiny_llama):
    out = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=0, echo=True, logprobs=1)
    refs = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    assert len(out.choices) == 2
    assert out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)
    for choice, ref, prompt in zip(sorted(out.choices, key=lambda c: c.index), refs, PROMPTS):
        assert choice.text == prompt
        assert choice.finish_reason == "length"
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(ref.prompt_token_ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = [e[t].logprob for t, e in zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:])]
        assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
        assert lp.token_logprobs[1:] == pytest.approx(hf_prompt_logprobs(tiny_llama[1], ref.prompt_token_ids),
                                                      abs=1e-4)
        assert "".join(lp.tokens).endswith(prompt)  # the tokens include the BOS token, the text does not
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert wait_until(lambda: pool_is_full(engine))


def test_echo_max_tokens_zero_streamed(server, engine):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 0, "echo": True, "logprobs": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert "".join(c["text"] for c in choices) == PROMPTS[0]
    assert choices[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 0
    assert wait_until(lambda: pool_is_full(engine))


def test_echo_max_tokens_zero_without_logprobs(client, engine):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=0, echo=True)
    assert out.choices[0].text == PROMPTS[1] and out.choices[0].logprobs is None
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 0
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=0)
    assert plain.choices[0].text == "" and plain.usage.completion_tokens == 0
    assert wait_until(lambda: pool_is_full(engine))


def test_echo_with_completion(client, offline, tiny_llama):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, echo=True, logprobs=2,
                                    temperature=0, extra_body={"ignore_eos": True})
    ref = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                      prompt_logprobs=2, logprobs=2), use_tqdm=False)[0]
    choice = out.choices[0]
    assert choice.text == PROMPTS[0] + ref.outputs[0].text
    lp = choice.logprobs
    ids = ref.prompt_token_ids + ref.outputs[0].token_ids
    assert len(lp.tokens) == len(ids) and out.usage.completion_tokens == 4
    expected = [e[t].logprob for t, e in zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:])]
    expected += [e[t].logprob for t, e in zip(ref.outputs[0].token_ids, ref.outputs[0].logprobs)]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert lp.token_logprobs[1:] == pytest.approx(hf_prompt_logprobs(tiny_llama[1], ids), abs=1e-4)
