"""SnapKV's selection rule (runner/kv_compaction.kept_entries) against a plain numpy statement of it:
per KV head, the last `window` entries, and of the others the `budget - window` with the highest
score max-pooled over the `pool` positions centred on each (clipped at the edges; of equal pooled
scores the earlier position), returned in position order. Pool widths as wide as a multi-token
span (15) keep the whole span around an attended token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fuselm.kv_compression import KVCompression
from fuselm.runner.kv_compaction import kept_entries


def reference_kept(scores: np.ndarray, budget: int, window: int, pool: int) -> list[list[int]]:
    kv_heads, entries = scores.shape
    half = pool // 2
    kept = []
    for head in scores:
        older = head[:entries - window]
        pooled = [older[max(0, i - half):i + half + 1].max() for i in range(len(older))]
        ranked = sorted(range(len(older)), key=lambda i: (-pooled[i], i))
        kept.append(sorted(ranked[:budget - window]) + list(range(entries - window, entries)))
    return kept


@pytest.mark.parametrize("pool", [1, 3, 7, 15])
@pytest.mark.parametrize("entries,budget,window", [(200, 50, 8), (97, 40, 32), (64, 63, 1)])
def test_kept_entries_follow_the_rule(pool, entries, budget, window):
    rng = np.random.default_rng(entries * 31 + pool)
    # coarse values so that pooled scores tie often and the tie rule matters
    scores = rng.integers(0, 12, size=(3, entries)).astype(np.float32) / 11
    got = kept_entries(torch.from_numpy(scores), budget, window, pool)
    assert got.tolist() == reference_kept(scores, budget, window, pool)


def test_a_wide_pool_keeps_the_span_after_an_attended_token():
    """One attended token at position 40 among flat scores: a pool of 15 and room for 15 entries keep
    positions 33..47 (the seven tokens on each side), a pool of 7 only 37..43 and then the earliest."""
    entries, window = 120, 8
    scores = torch.full((1, entries), 0.01)
    scores[0, 40] = 1.0
    wide = kept_entries(scores, 15 + window, window, 15)[0, :15].tolist()
    assert wide == list(range(33, 48))
    narrow = kept_entries(scores, 15 + window, window, 7)[0, :15].tolist()
    assert narrow == list(range(0, 8)) + list(range(37, 44))



def test_the_default_pool_is_fifteen_positions():
    """The documented default (docs/kv_compression.md): a window of 32 queries, max-pooling over 15."""
    settings = KVCompression.parse({"method": "snapkv", "budget": 512})
    assert (settings.window, settings.pool) == (32, 15)
