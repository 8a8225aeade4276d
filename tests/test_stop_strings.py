"""The stop-string automaton agrees with the naive check it replaced.

The reference is the check the engine ran before (each stop string searched with str.find in the
tail the new text could complete, the earliest start winning, ties to the earlier string in the
list) and the hold-back by its definition (the longest suffix of the text that is a proper prefix
of a stop string). Hypothesis draws texts over a small alphabet, so stop strings overlap, repeat
and are prefixes of one another, and splits them into random increments as detokenisation does.
"""

from __future__ import annotations

import gc
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuselm import LLM, SamplingParams
from fuselm.core.request import Request
from fuselm.engine.detokenizer import find_stop_string, visible_text
from fuselm.stop_strings import StopMatcher

ALPHABET = "abc"


def naive_first_stop(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """The engine's former check: search each stop string from where the new text could complete one."""
    search_from = max(0, len(text) - new_len - max(len(s) for s in stops) + 1)
    best = None
    for stop in stops:
        pos = text.find(stop, search_from)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    return best


def naive_holdback(text: str, stops: list[str]) -> int:
    return max((k for k in range(len(text) + 1) for s in stops if k < len(s) and text.endswith(s[:k])), default=0)


def first_stop_ending_after(text: str, report_from: int, stops: list[str]) -> tuple[int, str] | None:
    """By definition: of the occurrences that end at index >= report_from, the earliest start, then list order."""
    found = [(start, i) for i, s in enumerate(stops) for start in range(len(text))
             if text.startswith(s, start) and start + len(s) - 1 >= report_from]
    if not found:
        return None
    start, i = min(found)
    return start, stops[i]


@st.composite
def stops_and_pieces(draw):
    words = st.text(ALPHABET, min_size=1, max_size=5)
    stops = draw(st.lists(words, min_size=1, max_size=8))
    if draw(st.booleans()):  # add prefixes of the stops drawn, so some are prefixes of others
        stops += [s[:k] for s in stops[:3] for k in range(1, len(s)) if draw(st.booleans())]
    stops = draw(st.permutations(stops))
    pieces = draw(st.lists(st.text(ALPHABET, max_size=6), max_size=12))
    return list(stops), pieces


def request_with(stops: list[str], include_stop: bool = False) -> Request:
    params = SamplingParams(stop=stops, include_stop_str_in_output=include_stop)
    return Request("r", None, [1], params, max_tokens=100, arrival_seq=0)


@settings(max_examples=400, deadline=None)
@given(stops_and_pieces())
def test_automaton_matches_the_naive_check_piece_by_piece(case):
    stops, pieces = case
    matcher = StopMatcher(tuple(stops))
    state, text = 0, ""
    for piece in pieces:
        scanned, text = len(text), text + piece
        state, match = matcher.feed(state, text, scanned, scanned)
        expected = naive_first_stop(text, len(piece), stops) if piece else None
        assert (None if match is None else (match[0], stops[match[1]])) == expected, (text, piece)
        if match is not None:
            return  # the engine stops the sequence at its first stop string
        assert matcher.holdback(state) == naive_holdback(text, stops), text


@settings(max_examples=300, deadline=None)
@given(stops_and_pieces(), st.booleans())
def test_detokenizer_cuts_and_holds_back_like_the_naive_check(case, include_stop):
    stops, pieces = case
    req = request_with(stops, include_stop)
    text = ""
    for piece in pieces:
        text += piece
        req.output_text += piece
        expected = naive_first_stop(text, len(piece), stops) if piece else None
        stop = find_stop_string(req, len(piece))
        if expected is not None:
            pos, expected_stop = expected
            assert stop == expected_stop
            assert req.output_text == text[:pos + len(expected_stop) if include_stop else pos]
            return
        assert stop is None and req.output_text == text
        shown = visible_text(req)
        assert shown == (text if include_stop else text[:len(text) - naive_holdback(text, stops)])


@settings(max_examples=300, deadline=None)
@given(stops_and_pieces(), st.data())
def test_text_read_unchecked_is_never_matched_later(case, data):
    """While min_tokens holds stop strings off, new text is read but not matched; the first checked
    piece matches only stop strings that end inside it."""
    stops, pieces = case
    req = request_with(stops)
    checked_from = data.draw(st.integers(0, len(pieces)))
    text = ""
    for k, piece in enumerate(pieces):
        text += piece
        req.output_text += piece
        if k < checked_from:
            # unchecked text is still shown minus the tail a stop string could complete, even right
            # after a whole stop string that went unmatched
            assert visible_text(req) == text[:len(text) - naive_holdback(text, stops)]
            continue
        expected = first_stop_ending_after(text, len(text) - len(piece), stops) if piece else None
        stop = find_stop_string(req, len(piece))
        assert stop == (None if expected is None else expected[1]), (text, piece)
        if stop is not None:
            assert req.output_text == text[:expected[0]]
            return


@pytest.mark.parametrize("stops", [["abcd", "bc"], ["a", "ab"], ["ab", "a"], ["b", "b"], ["aaa", "aa", "a"]])
def test_ties_and_overlaps_in_one_piece(stops):
    for text in ["abcd", "xab", "aaab", "bb"]:
        matcher = StopMatcher(tuple(stops))
        _, match = matcher.feed(0, text, 0, 0)
        expected = naive_first_stop(text, len(text), stops)
        assert (None if match is None else (match[0], stops[match[1]])) == expected, text


def test_the_automaton_has_at_most_one_node_per_stop_character():
    """The build is one pass over the stop strings: its size is bounded by their total length."""
    stops = tuple(f"stop{i}" for i in range(2000)) + ("st", "op", "p1")
    matcher = StopMatcher(stops)
    assert matcher.num_nodes <= 1 + sum(len(s) for s in stops)


def test_equal_stop_lists_share_one_automaton():
    a = SamplingParams(stop=["x", "yz"])
    assert a.stop_matcher is SamplingParams(stop=["x", "yz"]).stop_matcher is a.clone(temperature=0).stop_matcher
    assert SamplingParams().stop_matcher is None


def test_a_large_stop_list_is_not_kept_after_its_last_user():
    params = SamplingParams(stop=[f"{i:07d}" for i in range(20_000)])
    assert params.clone(n=2).stop_matcher is params.stop_matcher
    alive = weakref.ref(params.stop_matcher)
    del params
    gc.collect()
    assert alive() is None


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama[0], dtype="float32", device="cpu")


def test_many_stop_strings_give_the_same_completion_as_the_one_that_matches(llm):
    """A stop list padded with thousands of strings that never occur (they hold a NUL) stops the
    generation where the one real stop string does, with the same text and stop reason."""
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, n=2)
    reference = llm.generate([5, 6, 7, 8], greedy, use_tqdm=False)[0].outputs[0].text
    windows = (reference[i:i + 3] for i in range(len(reference) // 3, len(reference) - 3))
    stop = next((w for w in windows if "\ufffd" not in w and "\x00" not in w), None)
    assert stop is not None, reference
    padding = [f"\x00{i}" for i in range(5000)]
    alone = llm.generate([5, 6, 7, 8], greedy.clone(stop=[stop]), use_tqdm=False)[0]
    padded = llm.generate([5, 6, 7, 8], greedy.clone(stop=padding + [stop] + padding), use_tqdm=False)[0]
    assert alone.outputs[0].text == reference[:reference.find(stop)]
    for a, p in zip(alone.outputs, padded.outputs):
        assert (p.text, p.stop_reason, p.finish_reason) == (a.text, stop, "stop")
