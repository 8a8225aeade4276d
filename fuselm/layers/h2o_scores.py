"""H2O's accumulated attention: what every attention layer adds, in a step that computes tokens of
an H2O request, to that request's heavy-hitter scores (layers/paged_attention.py calls
`capture_h2o_scores` after its attention; the runner keeps the sums and compacts the cache:
runner/h2o_compaction.py).

The C decode kernel returns no attention weights, so the weights are computed again here, for the
H2O rows of the step only: each of the row's queries against every cache entry the request holds
(causal: a query sees entries up to its own), softmax in float32 from the cache as stored (an int8
cache dequantised), summed over the queries and over the query heads of each KV head ->
[kv_heads, entries]. A decode step costs one more pass over the request's keys; a prompt chunk
one more q.k product (its causal triangle), taken in slices of queries so the weights stay small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

QUERY_SLICE = 256  # queries whose weights are materialised at once: [Hq, 256, entries] floats


@dataclass
class H2OCapture:
    seq_id: int
    query_index: torch.Tensor  # [n] int64: the row's queries in the packed batch
    query_entry: torch.Tensor  # [n] int64: their cache indices (a query sees entries up to its own)
    context_slots: torch.Tensor  # [entries] int64: cache slot of every cache index of the request after the step
    budget: int
    recent: int
    keep: int  # compact to this many entries after the step; 0: no compaction
    scores: list[torch.Tensor] = field(default_factory=list)  # per layer, in call order: [kv_heads, entries]


def capture_h2o_scores(captures: list[H2OCapture], q: torch.Tensor, flat_k: torch.Tensor,
                       flat_ks: torch.Tensor | None, scale: float) -> None:
    """Add one layer's attention weights to every capture. q [T, Hq, D] (this step's queries);
    flat_k [slots, Hkv, D] the layer's key cache, flat_ks its int8 scales or None."""
    for cap in captures:
        keys = flat_k[cap.context_slots].float()  # [L, Hkv, D]
        if flat_ks is not None:
            keys = keys * flat_ks[cap.context_slots].float().unsqueeze(-1)
        entries, kv_heads, head_dim = keys.shape
        keys_t = keys.permute(1, 2, 0)  # [Hkv, D, L]
        total = keys.new_zeros(kv_heads, entries)
        last_entries = cap.query_entry.tolist()
        for first in range(0, len(last_entries), QUERY_SLICE):
            index = cap.query_index[first:first + QUERY_SLICE]
            n = index.shape[0]
            end = last_entries[first + n - 1] + 1  # entries past the slice's last query are nobody's past
            queries = (q[index].float() * scale).view(n, kv_heads, -1, head_dim).permute(1, 2, 0, 3)  # [Hkv, g, n, D]
            logits = torch.matmul(queries, keys_t[:, :, :end].unsqueeze(1))  # [Hkv, g, n, end]
            future = torch.arange(end, device=keys.device) > cap.query_entry[first:first + n].unsqueeze(1)  # [n, end]
            logits.masked_fill_(future, float("-inf"))
            total[:, :end] += logits.softmax(-1).sum(dim=(1, 2))
        cap.scores.append(total)  # [Hkv, L]
