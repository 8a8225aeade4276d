"""Incremental, UTF-8-safe detokenisation, stop-string matching and the text a stream may show.

`tokenizers.decoders.DecodeStream` holds back bytes until they form whole characters, so a
multi-byte character split across tokens never reaches the user half-written. Stop strings are
searched only in the tail that the new text could complete, and are cut from the returned text.
While a request runs, `visible_text` also holds back the tail that a stop string could still
complete (and so cut): every unfinished output shows a prefix of the final text, so a stream of
deltas never prints what is cut later.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from fuselm.core.request import Request
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


def find_stop_string(request: Request, new_text_len: int) -> str | None:
    """If a stop string now appears in the output, cut the text there and return it."""
    stops = request.params.stop_strings
    if not stops or not new_text_len:
        return None
    text = request.output_text
    longest = max(len(s) for s in stops)
    search_from = max(0, len(text) - new_text_len - longest + 1)
    best_pos, best_stop = -1, None
    for stop in stops:
        pos = text.find(stop, search_from)
        if pos != -1 and (best_pos == -1 or pos < best_pos):
            best_pos, best_stop = pos, stop
    if best_stop is None:
        return None
    keep = best_pos + len(best_stop) if request.params.include_stop_str_in_output else best_pos
    request.output_text = text[:keep]
    return best_stop


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
    held = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:length]):
                held = length
                break
    return held


def visible_text(request: Request) -> str:
    """The output text an output of this request may show now: all of it once finished; while it
    runs, all but the tail a stop string could still cut. With include_stop_str_in_output a cut
    falls after the stop string, past all the text already there, so nothing is held back."""
    text = request.output_text
    params = request.params
    if request.is_finished or params.include_stop_str_in_output or not params.stop_strings:
        return text
    return text[:len(text) - stop_string_holdback(text, params.stop_strings)]
