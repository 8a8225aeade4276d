"""SnapKV's observation-window scores, added by every attention layer of a step that ends a prompt
marked for SnapKV (layers/paged_attention.py calls `capture_scores` after its attention; the runner
builds the captures and compacts the cache from the scores: runner/kv_compaction.py).

Per layer: the softmax attention of the observation window (a row's last `window` queries of the
step, causal) over every cache entry of the request, summed over those queries and over the query
heads of each KV head -> [kv_heads, entries]. Computed from the cache as stored (an int8 cache
dequantised), in float32: window x entries per head, small next to the prefill itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SnapKVCapture:
    query_index: torch.Tensor  # [w] int64: the observation window's queries in the packed batch
    query_entry: torch.Tensor  # [w] int64: their cache indices (a query sees entries up to its own)
    context_slots: torch.Tensor  # [entries] int64: cache slot of every cache index of the request
    budget: int
    window: int
    pool: int
    scores: list[torch.Tensor] = field(default_factory=list)  # per layer, in call order: [kv_heads, entries]


def capture_scores(captures: list[SnapKVCapture], q: torch.Tensor, flat_k: torch.Tensor, flat_ks: torch.Tensor | None,
                   scale: float) -> None:
    """Add one layer's observation-window scores to every capture. q [T, Hq, D] (this step's
    queries); flat_k [slots, Hkv, D] the layer's key cache, flat_ks its int8 scales or None."""
    for cap in captures:
        keys = flat_k[cap.context_slots].float()  # [L, Hkv, D]
        if flat_ks is not None:
            keys = keys * flat_ks[cap.context_slots].float().unsqueeze(-1)
        entries, kv_heads, head_dim = keys.shape
        queries = q[cap.query_index].float()  # [w, Hq, D]
        w = queries.shape[0]
        queries = queries.view(w, kv_heads, -1, head_dim)  # [w, Hkv, group, D]
        logits = torch.einsum("wkgd,lkd->kgwl", queries, keys) * scale  # [Hkv, group, w, L]
        future = torch.arange(entries, device=keys.device).unsqueeze(0) > cap.query_entry.unsqueeze(1)  # [w, L]
        logits.masked_fill_(future, float("-inf"))
        cap.scores.append(logits.softmax(-1).sum(dim=(1, 2)))  # [Hkv, L]
