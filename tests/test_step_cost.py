"""PromptChunkLimiter (fuselm/core/step_cost.py): the cap it derives from measured step costs,
and an engine with max_decode_slowdown giving the same greedy tokens as one without."""

from __future__ import annotations

import pytest

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.core.step_cost import PromptChunkLimiter


def test_cap_follows_the_measured_costs():
    limiter = PromptChunkLimiter(2.0, min_chunk=16)
    assert limiter.cap(4) is None  # nothing measured yet: the token budget alone
    for decodes in (1, 2, 4, 8, 4, 2):  # 40 ms + 1 ms per decoding row
        limiter.observe(decodes, 0, 0.040 + 0.001 * decodes)
    for decodes, prompt in ((4, 64), (2, 128), (0, 256)):  # 2 ms per prompt token on top
        fixed = 0.040 + 0.001 * decodes if decodes else 0.040
        limiter.observe(decodes, prompt, fixed + 0.002 * prompt)
    assert limiter.seconds_per_prompt_token == pytest.approx(0.002, rel=0.05)
    # a 4-row decode step takes 44 ms: (2 - 1) * 44 ms / 2 ms = 22 prompt tokens
    assert limiter.cap(4) == pytest.approx(22, abs=1)
    assert limiter.cap(0) is None  # no decodes to protect
    assert PromptChunkLimiter(1.2, min_chunk=16).cap(4) is None
    slow = PromptChunkLimiter(1.05, min_chunk=16)
    slow.decode, slow._prompt = limiter.decode, limiter._prompt  # the same measurements
    assert slow.cap(4) == 16  # never below min_chunk: prompts always progress


def test_slowdown_must_exceed_one():
    with pytest.raises(ValueError, match="max_decode_slowdown must be > 1"):
        LLM(max_decode_slowdown=1.0)


def test_default_floor_is_below_a_block():
    limiter = PromptChunkLimiter(1.05)
    for decodes in (1, 2, 4, 8, 4, 2):
        limiter.observe(decodes, 0, 0.040 + 0.001 * decodes)
    limiter.observe(4, 64, 0.044 + 0.064)  # 1 ms per prompt token: (1.05 - 1) * 44 ms allows 2
    assert limiter.cap(4) == PromptChunkLimiter.MIN_CHUNK == 4


@pytest.mark.parametrize("slowdown", [1.5, 1.01])
def test_engine_with_limiter_gives_the_same_tokens_and_smaller_chunks(tiny_llama, slowdown):
    """Long prompts arriving while others decode: with the limiter their chunks shrink to its cap
    (recorded around the real scheduler), and the greedy tokens are those of the plain engine. At
    1.01 the cap sits on its floor: chunks smaller than a KV block."""
    path, _ = tiny_llama
    prompts = random_prompts([200, 7, 150, 9, 300, 12], seed=5)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=256)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    engine = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=256, max_decode_slowdown=slowdown).engine
    scheduler, limiter = engine.scheduler, engine.scheduler.prompt_limiter
    schedule, capped = scheduler.schedule, []

    def recording_schedule():
        decodes = sum(r.num_tokens - r.num_computed_tokens == 1 for r in scheduler.running)
        cap = limiter.cap(decodes)
        out = schedule()
        if cap is not None and not out.preempted_ids:
            capped.append((cap, sum(r.num_new_tokens for r in out.scheduled if r.num_new_tokens > 1)))
        return out

    scheduler.schedule = recording_schedule
    outputs = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending:  # one arrival every 3 steps, so prompts meet running decodes
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params)
        for _ in range(3):
            for o in engine.step():
                if o.finished:
                    outputs[o.request_id] = o.outputs[0].token_ids
    assert [outputs[str(i)] for i in range(len(prompts))] == want
    assert limiter.decode.fitted and limiter.seconds_per_prompt_token is not None
    assert capped and all(prompt <= cap for cap, prompt in capped)
    assert any(cap < 256 for cap, _ in capped)  # the cap did bite: a chunk smaller than the budget
    if slowdown < 1.05:
        assert any(0 < prompt < engine.config.block_size for _, prompt in capped)
