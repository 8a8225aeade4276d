"""The engine's streamed outputs never show text that a stop string cuts later.

Each unfinished RequestOutput's text must be a prefix of the final text, so the deltas a caller
prints (the server, `fuselm chat`) concatenate to exactly the final completion. The reference is
the same greedy request run without stop strings: its text and where each step's text ended.
"""

from __future__ import annotations

import pytest

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.engine.detokenizer import stop_string_holdback

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama[0], dtype="float32", device="cpu")


def stream(llm: LLM, prompt, params: SamplingParams) -> list[str]:
    """The text of every output of one request, in order (the last one is the finished output)."""
    engine = llm.engine
    engine.add_request("streamed", prompt, params)
    texts = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
    return texts


def stop_across_a_step(texts: list[str], length: int = 3) -> tuple[str, int]:
    """A stop string of the final text whose first characters arrive one step before its last ones,
    so that the step in between shows a partial match; and where it first occurs."""
    final = texts[-1]
    ends = sorted({len(t) for t in texts})
    for start in range(1, len(final) - length):
        stop = final[start:start + length]
        split = any(start < end < start + length for end in ends)
        if split and final.find(stop) == start and "\ufffd" not in stop:
            return stop, start
    pytest.skip("no step boundary falls inside a repeated-free stop candidate")


@pytest.mark.parametrize("seed", [30, 31, 32])
def test_streamed_deltas_concatenate_to_the_final_text(llm, seed):
    prompt = random_prompts([12], seed=seed)[0]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    reference = stream(llm, prompt, greedy)
    stop, start = stop_across_a_step(reference)

    texts = stream(llm, prompt, greedy.clone(stop=[stop]))
    final = texts[-1]
    assert final == reference[-1][:start]  # the stop string and everything after it are cut
    printed = ""
    for text in texts:
        assert text.startswith(printed), f"{printed!r} was shown, then {text!r}"
        printed += text[len(printed):]
    assert printed == final


def test_include_stop_str_in_output_streams_without_holding_back(llm):
    prompt = random_prompts([12], seed=30)[0]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    reference = stream(llm, prompt, greedy)
    stop, start = stop_across_a_step(reference)
    texts = stream(llm, prompt, greedy.clone(stop=[stop], include_stop_str_in_output=True))
    assert texts[-1] == reference[-1][:start + len(stop)]
    assert texts[:-1] == reference[:len(texts) - 1]  # nothing held back: each step shows all it has


def test_a_partial_match_that_does_not_complete_is_released(llm):
    """A stop string that starts like the output's tail but never completes: the text is held only
    while the match is open and the finished text is the whole completion."""
    prompt = random_prompts([12], seed=31)[0]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    reference = stream(llm, prompt, greedy)
    final = reference[-1]
    candidates = [final[i:i + 2] + "\x00" for i in range(1, len(final) - 2) if "\ufffd" not in final[i:i + 2]]
    texts = stream(llm, prompt, greedy.clone(stop=candidates[:1]))
    assert texts[-1] == final
    assert all(final.startswith(t) for t in texts)


@pytest.mark.parametrize("text, stops", [
    ("hello wor", ["world"]),
    ("hello world", ["world"]),
    ("abcab", ["abcabd", "b"]),
    ("xa", ["ab", "aab"]),
    ("", ["ab"]),
    ("no match", ["zz"]),
])
def test_holdback_is_the_longest_tail_a_stop_string_could_complete(text, stops):
    """Against the definition: the longest suffix of the text that is a proper prefix of a stop string."""
    expected = max((k for k in range(len(text) + 1) for s in stops if k < len(s) and text.endswith(s[:k])), default=0)
    assert stop_string_holdback(text, stops) == expected
