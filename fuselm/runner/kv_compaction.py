"""KV compression in the runner: SnapKV's scoring and in-place compaction of a finished prompt's
cache, and the masks that keep StreamingLLM prompt chunks to each query's own window.

The scheduler marks the step that ends a request's prefill (ScheduledRequest.snapkv, from
core/kv_eviction.py). For such a row the runner puts a `SnapKVCapture` in the step's attention
metadata (`snapkv_captures`); every attention layer adds its observation-window scores
(layers/snapkv_scores.py). After the forward, `compact` keeps, per
layer and KV head, the last `window` entries and the `budget - window` others with the highest
max-pooled score, in position order, and writes them to cache indices 0 .. budget-1 of the same
blocks (the scheduler then frees the rest). Different heads keep different positions: keys carry
their rotary phase, so attention needs no positions. An int8 cache moves its scales alongside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuselm.core.kv_eviction import streaming_first_visible
from fuselm.layers.snapkv_scores import SnapKVCapture


def kept_entries(scores: torch.Tensor, budget: int, window: int, pool: int) -> torch.Tensor:
    """[Hkv, budget] cache indices each KV head keeps, ascending: the best-scored `budget - window`
    of the entries before the last `window` (scores max-pooled over `pool` neighbours; of equal
    scores the earlier position), then those."""
    kv_heads, entries = scores.shape
    window = min(window, entries)
    recent = torch.arange(entries - window, entries, device=scores.device).expand(kv_heads, window)
    older = scores[:, :entries - window]
    if pool > 1:
        older = F.max_pool1d(older.unsqueeze(0), kernel_size=pool, stride=1, padding=pool // 2).squeeze(0)
    # a stable sort: max-pooling gives neighbours equal scores, and ties go to the earlier position
    order = older.sort(dim=-1, descending=True, stable=True).indices
    best = order[:, :budget - window].sort(dim=-1).values  # [Hkv, budget - window]
    return torch.cat((best, recent), dim=-1)


def compact(captures: list[SnapKVCapture], attention_layers: list) -> None:
    """Move each capture's kept entries of every layer to cache indices 0 .. budget-1."""
    for cap in captures:
        assert len(cap.scores) == len(attention_layers), "a layer's attention did not report its scores"
        for attn, scores in zip(attention_layers, cap.scores):
            move_kept(attn, kept_entries(scores, cap.budget, cap.window, cap.pool), cap.context_slots)


def move_kept(attn, kept: torch.Tensor, context_slots: torch.Tensor) -> None:
    """Write one layer's kept entries (kept [Hkv, n] cache indices, ascending) to cache indices
    0 .. n-1 of the request (context_slots: the slot of every cache index), scales alongside."""
    kv_heads, n = kept.shape
    source = context_slots[kept].T  # [n, Hkv]: where each kept entry is now
    heads = torch.arange(kv_heads, device=kept.device)
    target = context_slots[:n]  # [n]
    for cache in (attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale):
        if cache is None:
            continue
        flat = cache.view(-1, kv_heads, *cache.shape[3:])  # [slots, Hkv(, D)]
        flat[target] = flat[source, heads]  # gathered (a copy) before it is written


def snapkv_captures(rows, row_start: list[int], slots_of, device: torch.device) -> list[SnapKVCapture] | None:
    """A capture for every row of the step marked for SnapKV (None when there is none). rows: the
    step's ScheduledRequests; row_start: where each row's tokens begin in the packed batch;
    slots_of(block_ids, start, end): the cache slots of cache indices [start, end)."""
    captures = []
    for i, r in enumerate(rows):
        if r.snapkv is None:
            continue
        budget, window, pool = r.snapkv
        n = r.num_new_tokens
        entries = r.num_computed_tokens - r.kv_offset + n  # the request's cache entries after this step
        w = min(window, n)  # the observation window: this step's last queries
        captures.append(SnapKVCapture(
            query_index=torch.arange(row_start[i] + n - w, row_start[i] + n, device=device),
            query_entry=torch.arange(entries - w, entries, device=device),
            context_slots=slots_of(r.block_ids, 0, entries).to(device), budget=budget, window=window, pool=pool))
    return captures or None


def streaming_visible(row, num_cached: int, num_new: int, block_size: int) -> torch.Tensor:
    """[n, cached + n] bool: which cache entries each of a StreamingLLM row's queries may see (the
    sinks, and the window its own position reaches: core/kv_eviction.streaming_first_visible)."""
    sink, window = row.kv_window
    sink_tokens = -(-sink // block_size) * block_size
    positions = torch.arange(row.num_computed_tokens, row.num_computed_tokens + num_new).unsqueeze(1)  # [n, 1]
    first = streaming_first_visible(positions, sink_tokens, window, block_size)  # [n, 1]
    entries = torch.arange(num_cached + num_new).unsqueeze(0)  # [1, cached + n]
    entry_positions = torch.where(entries < sink_tokens, entries, entries + row.kv_offset)
    return (entries < sink_tokens) | (entry_positions >= first)
