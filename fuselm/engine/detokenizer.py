"""Incremental, UTF-8-safe detokenisation and stop-string matching.

`tokenizers.decoders.DecodeStream` holds back bytes until they form whole characters, so a
multi-byte character split across tokens never reaches the user half-written. Stop strings are
searched only in the tail that the new text could complete, and are cut from the returned text.
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
