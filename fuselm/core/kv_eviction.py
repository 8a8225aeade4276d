"""The block side of KV compression (fuselm/kv_compression.py): which blocks a compressed request
gives back to the pool, and where its positions sit in the blocks it keeps.

A compressed request's cache holds fewer entries than its sequence has positions. Its entries stay
packed at the front of its block table: cache index i is slot block_ids[i // block_size] and
i % block_size, and every position computed after the last eviction sits at index
p - `Request.kv_offset` (the count of positions evicted so far). Keys keep the rotary phase of
their own position; new queries take their true position. The runner (runner/model_runner.py)
maps positions to cache indices with the offset, KVCacheManager counts blocks by cache entries, so
the scheduler admits and preempts by the compressed size.

- StreamingLLM (`evict_streaming`, before a step is scheduled): the sink blocks (the first
  ceil(sink / block_size) blocks) stay; whole blocks after them that lie before the last `window`
  entries leave the table and return to the pool. No K/V moves. What a query sees depends on its
  position only (`streaming_first_visible`), never on how prompts were chunked: the runner masks
  a chunk's queries to their own windows, and a single decode token sees what the cache holds.
- SnapKV (`snapkv_step`, then `finish_compaction`): the step that computes the last token of a prefill is
  marked (`snapkv_chunk` keeps the last `window` prompt tokens together in that step); the
  runner scores and compacts the kept entries of every layer into cache indices
  0 .. budget-1 of the same blocks (runner/kv_compaction.py); after the step the blocks past them
  return to the pool.
- H2O (`h2o_step`): every step of the request is marked with (budget, recent, keep); the runner
  adds the step's attention to the request's accumulated scores (layers/h2o_scores.py) and, when
  `keep` is set (the step reaches the sequence's end and leaves budget + recent + one block of
  entries or more), compacts the cache to `keep` = budget + recent entries
  (runner/h2o_compaction.py); after the step the blocks past them return to the pool
  (`finish_compaction` does the same for both). A step that ends the prompt computed it with full
  attention, so the first generated token is the uncompressed one.

Compressed requests never use the prefix cache: they take no hits and register no blocks
(KVCacheManager checks `Request.kv_compression`), since compaction rewrites their blocks in place.
A preempted request starts again uncompressed (kv_offset 0) and compresses again as it recomputes.
"""

from __future__ import annotations

import torch

from fuselm.core.kv_cache import KVCacheManager
from fuselm.core.request import Request


def evict_streaming(kv: KVCacheManager, request: Request) -> int:
    """Return the blocks a StreamingLLM request no longer keeps; the number of blocks freed."""
    settings = request.kv_compression
    if settings is None or settings.method != "streaming":
        return 0
    bs = kv.block_size
    sink_blocks = -(-settings.sink // bs)
    cached = request.num_computed_tokens - request.kv_offset  # computed entries in the cache
    surplus = (cached - sink_blocks * bs - settings.window) // bs  # whole blocks before the window
    if surplus <= 0:
        return 0
    dead = request.block_ids[sink_blocks:sink_blocks + surplus]
    kv.pool.release(dead)
    del request.block_ids[sink_blocks:sink_blocks + surplus]
    request.kv_offset += surplus * bs
    return surplus


def streaming_window(request: Request) -> tuple[int, int] | None:
    """(sink, window) of a StreamingLLM request, None for any other."""
    settings = request.kv_compression
    return (settings.sink, settings.window) if settings is not None and settings.method == "streaming" else None


def streaming_cache_positions(request: Request) -> bool:
    """Whether a StreamingLLM request takes rotary positions in the cache (`"positions": "cache"`)."""
    settings = request.kv_compression
    return settings is not None and settings.method == "streaming" and settings.positions == "cache"


def streaming_first_visible(position: torch.Tensor, sink_tokens: int, window: int, block_size: int):
    """The first position after the sinks that the queries at `position` (int64) see: eviction is block-granular, so the window starts at a block boundary, keeping `window` to
    window + block_size - 1 positions. sink_tokens: the sinks rounded up to whole blocks."""
    return sink_tokens + block_size * ((position - sink_tokens - window) // block_size).clamp_min(0)


def snapkv_chunk(request: Request, remaining: int, num_tokens: int) -> int:
    """How many of `num_tokens` prompt tokens a SnapKV request may compute this step: its last
    `window` tokens must all be in the step that ends the prefill (their queries score the prompt),
    so a chunk leaves nothing or at least `window` tokens behind it; 0 = wait for a larger budget."""
    settings = request.kv_compression
    if settings is None or settings.method != "snapkv" or request.kv_offset or num_tokens >= remaining \
            or request.num_tokens <= settings.budget or remaining - num_tokens >= settings.window:
        return num_tokens
    return max(0, remaining - settings.window)


def snapkv_step(request: Request, start: int, num_new_tokens: int) -> tuple[int, int, int] | None:
    """(budget, window, pool) when the step computing request's tokens [start, start + n) ends its
    prefill (the prompt, or after a preemption everything recomputed) with more entries than the
    budget; None otherwise."""
    settings = request.kv_compression
    if settings is None or settings.method != "snapkv" or request.kv_offset:
        return None
    ends_prefill = start + num_new_tokens == request.num_tokens and (num_new_tokens > 1 or start < request.num_prompt_tokens)
    if not ends_prefill or request.num_tokens <= settings.budget:
        return None
    return settings.budget, settings.window, settings.pool


def finish_compaction(kv: KVCacheManager, request: Request, kept: int) -> None:
    """After the runner compacted the request's cache to `kept` entries (SnapKV's budget, H2O's budget
    plus recent): free the blocks past them."""
    keep = -(-kept // kv.block_size)
    kv.pool.release(request.block_ids[keep:])
    del request.block_ids[keep:]
    request.kv_offset = request.num_computed_tokens - kept


def h2o_step(request: Request, start: int, num_new_tokens: int, block_size: int) -> tuple[int, int, int] | None:
    """(budget, recent, keep) for every step of an H2O request, None for any other request. keep:
    the cache entries to compact to after the step (budget + recent), or 0 when the step leaves
    the cache as it is (mid-prompt, or fewer than budget + recent + block_size entries)."""
    settings = request.kv_compression
    if settings is None or settings.method != "h2o":
        return None
    keep = settings.budget + settings.recent
    entries = start + num_new_tokens - request.kv_offset
    compacts = start + num_new_tokens == request.num_tokens and entries >= keep + block_size
    return settings.budget, settings.recent, keep if compacts else 0


def is_h2o(request: Request) -> bool:
    return request.kv_compression is not None and request.kv_compression.method == "h2o"
