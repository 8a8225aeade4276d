"""The attention layout of KV cache groups 1.. of a step (core/kv_groups.py).

A model with sliding-window layers keeps one block table per KV cache group. The runner builds
group 0's layout as for any model; this file derives every other group's from it: the same rows,
positions, context lengths and masks, only the cache slots differ (that group's block table). The
layers read their group's layout through `get_attention_metadata(group)`. Shared-prefix (cascade)
attention is planned over group 0's tables and full-attention layers only; other groups go without.
"""

from __future__ import annotations

import dataclasses

import torch

from fuselm.core.scheduler_output import ScheduledRequest
from fuselm.layers.paged_attention import AttentionMetadata, PrefillRow


def table_of(row: ScheduledRequest, group: int) -> tuple[int, ...]:
    return row.block_ids if group == 0 else row.group_block_ids[group - 1]


def slots_of(table: tuple[int, ...], start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions [start, end) through a block table: [end - start] int64."""
    pos = torch.arange(start, end)
    return torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


def group_metadata(base: AttentionMetadata, rows: tuple[ScheduledRequest, ...], query_rows: list[int],
                   long_rows: list[int], group: int, block_size: int, null_block: int,
                   query_positions: torch.Tensor, device: torch.device) -> AttentionMetadata:
    """Group `group`'s metadata for the step whose group-0 metadata is `base`.

    query_rows: the rows whose tokens are query rows, in packed order; long_rows: the prompt-chunk
    rows, in packed order; query_positions: the position of every query row [num_query_rows]."""
    bs = block_size
    nd = base.num_query_rows
    slot_parts = []
    table = None
    if nd:
        tables = [table_of(rows[i], group) for i in query_rows for _ in range(rows[i].num_new_tokens)]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + (null_block,) * (width - len(t)) for t in tables], dtype=torch.long)  # [nd, width]
        block = table.gather(1, (query_positions // bs).unsqueeze(1)).squeeze(1)  # [nd]
        slot_parts.append(block * bs + query_positions % bs)
    prefill_rows = []
    for i, row in zip(long_rows, base.prefill_rows):
        r = rows[i]
        t, c, n = table_of(r, group), r.num_computed_tokens, r.num_new_tokens
        slot_parts.append(slots_of(t, c, c + n, bs))
        ctx_slots = None if row.context_slots is None else slots_of(t, 0, c + n, bs).to(device)
        prefill_rows.append(PrefillRow(row.start, row.end, row.num_cached, ctx_slots, row.causal_mask))
    meta = dataclasses.replace(base, slot_mapping=torch.cat(slot_parts).to(device), prefill_rows=prefill_rows,
                               groups=None, cascade=None)  # window masks depend on positions only: shared
    if table is not None:
        if base.decode_block_table is not None:
            meta.decode_block_table = table
        if base.decode_context_slots is not None:
            max_len = base.decode_context_slots.shape[1]
            slots = (table.unsqueeze(-1) * bs + torch.arange(bs)).view(nd, -1)[:, :max_len]  # [nd, L]
            valid = base.decode_mask.view(nd, max_len).cpu()
            meta.decode_context_slots = torch.where(valid, slots, null_block * bs).to(device)
    return meta
