"""H2O in the runner: the accumulated attention scores of every running H2O sequence, and the
compaction of its cache to the heavy hitters plus the recent entries.

The scheduler marks every step row of an H2O request (ScheduledRequest.h2o, core/kv_eviction.py).
For such a row the runner puts an `H2OCapture` in the step's attention metadata (`h2o`); every
attention layer adds the attention the row's queries give each cache entry
(layers/h2o_scores.py), and after the forward `H2OScores.update` adds them to the sequence's sums,
[layers, kv_heads, entries], indexed like the cache. A row marked to compact (`keep` > 0) then keeps,
per layer and KV head, the last `recent` entries and the `budget` others with the highest sums (of
equal sums the earlier position), in position order, at cache indices 0 .. keep-1 (the scheduler
frees the blocks past them), and the sums follow their entries. Only H2O rows pay for any of it.

The sums live here, by seq_id: a row starting at token 0 (a new sequence, or one recomputed after a
preemption) starts them from zero, and a finished sequence's are dropped.
"""

from __future__ import annotations

import torch

from fuselm.layers.h2o_scores import H2OCapture
from fuselm.runner.kv_compaction import kept_entries, move_kept


class H2OScores:
    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}  # seq_id -> [layers, kv_heads, capacity] float32

    def captures(self, rows, row_start: list[int], slots_of, device: torch.device) -> list[H2OCapture] | None:
        """A capture for every H2O row of the step (None when there is none). rows: the step's
        ScheduledRequests; row_start: where each row's tokens begin in the packed batch;
        slots_of(block_ids, start, end): the cache slots of cache indices [start, end)."""
        captures = []
        for i, r in enumerate(rows):
            if r.h2o is None:
                continue
            if r.num_computed_tokens == 0:
                self.sums.pop(r.seq_id, None)
            budget, recent, keep = r.h2o
            n = r.num_new_tokens
            entries = r.num_computed_tokens - r.kv_offset + n  # the request's cache entries after this step
            captures.append(H2OCapture(
                seq_id=r.seq_id, query_index=torch.arange(row_start[i], row_start[i] + n, device=device),
                query_entry=torch.arange(entries - n, entries, device=device),
                context_slots=slots_of(r.block_ids, 0, entries).to(device), budget=budget, recent=recent, keep=keep))
        return captures or None

    def update(self, captures: list[H2OCapture], attention_layers: list) -> None:
        """Add the step's scores to each sequence's sums; compact the caches of rows marked to."""
        for cap in captures:
            assert len(cap.scores) == len(attention_layers), "a layer's attention did not report its scores"
            step = torch.stack(cap.scores)  # [layers, Hkv, entries]
            entries = step.shape[-1]
            sums = self.sums.get(cap.seq_id)
            if sums is None or sums.shape[-1] < entries:
                grown = step.new_zeros(*step.shape[:2], max(entries, 2 * (0 if sums is None else sums.shape[-1])))
                if sums is not None:
                    grown[..., :sums.shape[-1]] = sums
                sums = self.sums[cap.seq_id] = grown
            sums[..., :entries] += step
            if not cap.keep:
                continue
            kept = [kept_entries(layer_sums[:, :entries], cap.keep, cap.recent, 1) for layer_sums in sums]
            for attn, layer_kept in zip(attention_layers, kept):
                move_kept(attn, layer_kept, cap.context_slots)
            compacted = torch.stack([layer_sums.gather(1, layer_kept) for layer_sums, layer_kept in zip(sums, kept)])
            sums.zero_()
            sums[..., :cap.keep] = compacted

    def release(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self.sums.pop(seq_id, None)
