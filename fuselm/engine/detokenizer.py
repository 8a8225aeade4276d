"""Incremental, UTF-8-safe detokenisation, stop-string matching and the text a stream may show.

`tokenizers.decoders.DecodeStream` holds back bytes until they form whole characters, so a
multi-byte character split across tokens never reaches the user half-written. Stop strings are
matched by the request's automaton (fuselm.stop_strings, shared by its SamplingParams), which each
sequence runs over its new text only, keeping its state in `request.stop_scan`: the cost per
token does not grow with the number of stop strings. A stop string is cut from the returned text.
While a request runs, `visible_text` also holds back the tail that a stop string could still
complete (and so cut), which the automaton's state gives directly: every unfinished output shows a
prefix of the final text, so a stream of deltas never prints what is cut later.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from fuselm.core.request import Request
from fuselm.stop_strings import StopMatcher, stop_matcher_for
from fuselm.tokenizer import Tokenizer

_CONTEXT_TOKENS = 4  # prompt tokens given to the stream so the first output token decodes in context


def append_text(tokenizer: Tokenizer, request: Request, token_id: int) -> str:
    """Decode one new token into request.output_text; returns the new text (may be empty)."""
    if request.decode_stream is None:
        context = request.prompt_token_ids[-_CONTEXT_TOKENS:]
        request.decode_stream = DecodeStream(ids=context or None,
                                             skip_special_tokens=request.params.skip_special_tokens)
    piece = request.decode_stream.step(tokenizer.hf, token_id) or ""
    request.output_text += piece
    return piece


class StopScan:
    """One sequence's automaton state and how many characters of its output_text it has read."""

    __slots__ = ("state", "scanned")

    def __init__(self) -> None:
        self.state = 0
        self.scanned = 0


def _scan(request: Request, matcher: StopMatcher, report_from: int) -> tuple[int, int] | None:
    """Feed the automaton the output text it has not read; the first stop occurrence ending at or
    after `report_from`, as (start, index of the stop string)."""
    scan = request.stop_scan
    text = request.output_text
    if scan is None or scan.scanned > len(text):  # first text, or text replaced: read it all again
        scan = request.stop_scan = StopScan()
    scan.state, match = matcher.feed(scan.state, text, scan.scanned, report_from)
    scan.scanned = len(text)
    return match


def find_stop_string(request: Request, new_text_len: int) -> str | None:
    """If a stop string now ends in the last `new_text_len` characters of the output, cut the text at
    the one that starts first (the earliest in the list on a tie) and return it. Text added before
    (while min_tokens held stop strings off) is read for the automaton's state but not matched."""
    matcher = request.params.stop_matcher
    if matcher is None or not new_text_len:
        return None
    match = _scan(request, matcher, len(request.output_text) - new_text_len)
    if match is None:
        return None
    start, index = match
    stop = matcher.stops[index]
    keep = start + len(stop) if request.params.include_stop_str_in_output else start
    request.output_text = request.output_text[:keep]
    return stop


def flush_text(tokenizer: Tokenizer, request: Request) -> None:
    """At finish, emit bytes the stream still holds back (an incomplete character becomes U+FFFD)."""
    context = request.prompt_token_ids[-_CONTEXT_TOKENS:]
    skip = request.params.skip_special_tokens
    head = tokenizer.decode(context, skip_special_tokens=skip)
    full = tokenizer.decode(context + request.output_token_ids, skip_special_tokens=skip)
    if full.startswith(head):
        tail = full[len(head):]
        if len(tail) > len(request.output_text) and tail.startswith(request.output_text):
            request.output_text = tail


def stop_string_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string: the
    characters a later token could turn into a stop string, which would then be cut."""
    if not stops:
        return 0
    matcher = stop_matcher_for(tuple(stops))
    state, _ = matcher.feed(0, text)
    return matcher.holdback(state)


def visible_text(request: Request) -> str:
    """The output text an output of this request may show now: all of it once finished; while it
    runs, all but the tail a stop string could still cut. With include_stop_str_in_output a cut
    falls after the stop string, past all the text already there, so nothing is held back."""
    text = request.output_text
    params = request.params
    if request.is_finished or params.include_stop_str_in_output or not params.stop_strings:
        return text
    _scan(request, params.stop_matcher, len(text))
    return text[:len(text) - params.stop_matcher.holdback(request.stop_scan.state)]
