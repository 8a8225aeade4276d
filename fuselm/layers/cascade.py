"""Shared-prefix ("cascade") attention for the query rows of a step: finding the groups of rows whose
block tables start with the same blocks, and the portable torch attention over them.

Sequences that share a prompt prefix (a system prompt, few-shot examples, the n samples of one
prompt) hold the same KV block ids for it: the prefix cache stores it once. A per-row attention still
reads it once per row, every step. Here, each step, rows whose tables start with the same block ids
(compared by id, never by token) are grouped; a group's attention runs in two parts: all its queries
(every query head of each KV head) against the shared blocks in one pass, then each row against its
own remaining blocks, the two merged exactly through their log-sum-exps (Hydragen, RelayAttention).
On CPU the C kernel (fuselm/kernels/cascade_attention.c) does both; `cascade_query_attention` is the
torch path (other devices, and the reference the kernel is tested against).

Grouping keeps each row in at most one group: a set of rows that share some blocks and then split
into subsets sharing more is grouped at whichever depth saves more block reads. Shared blocks end
before the position each row writes this step, so a group never reads a slot being written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Where grouping pays, measured (`benchmarks/shared_prefix.py --kernel-sweep`: one decode step's attention, 2
# threads, wall time; SmolLM2-135M's 9 query / 3 KV heads of 64, rows with ~40 tokens of their own; 2-vCPU Zen 4
# EPYC, float32 and bfloat16): decode attention on CPU is compute-bound (the shared blocks of a layer stay in
# cache across the rows), so the grouped pass wins only through its matrix form, and only with enough rows x
# shared blocks. Per-row time / grouped time, float32 / bfloat16: 2 rows sharing 64 blocks 0.91 (bf16); 4 rows
# sharing 16 blocks 0.92 / 0.91, 64 blocks 1.18 / 1.50; 8 rows sharing 16 blocks 1.01 / 1.09, 64 blocks 1.32 /
# 1.76; 16 rows sharing 8 blocks - / 1.11, 16 blocks 1.25 / 1.20; 64 rows sharing 4 blocks - / 1.04, 16 blocks
# 1.33 / 1.31, 64 blocks 1.88 / 2.43. So a group needs MIN_GROUP_ROWS rows, MIN_SHARED_BLOCKS shared blocks and
# MIN_GROUP_BLOCK_READS for rows x shared blocks (4 rows over 64 blocks, 8 over 32, 16 over 16).
MIN_GROUP_ROWS = 4
MIN_SHARED_BLOCKS = 16
MIN_GROUP_BLOCK_READS = 256
# A prompt chunk over a long cached context that other rows of the step also read (a request's own tail
# after a cached shared prefix, beside the other requests over it) attends as one query row per token on the
# C kernel path: its rows share all their cached blocks, so they join the other rows over the same prefix
# and the prefix is read once, in the shared pass's matrix form, when they share CHUNK_QUERY_ROWS_MIN_BLOCKS
# blocks with another row. A chunk whose leading blocks no other row
# shares (a later chunk of a long prompt) takes the chunk kernel (kernels/chunk_attention.c) instead: as
# query rows a lone request's 2,000-token prompt took 3.28 s against 2.85 s (Zen 4 EPYC, 2 threads, float32,
# SmolLM2-135M, best of 5 in each of two processes).
CHUNK_QUERY_ROWS_MIN_BLOCKS = 32
CHUNK_QUERY_ROWS_MAX_TOKENS = 512


def prefix_key(block_ids) -> tuple[int, ...]:
    """The leading blocks a row must share with another for its chunk to attend as query rows."""
    return tuple(block_ids[:CHUNK_QUERY_ROWS_MIN_BLOCKS])


def chunk_as_query_rows(num_new_tokens: int, num_cached: int, block_size: int, sharers: int) -> bool:
    """Whether a prompt chunk of `num_new_tokens` after `num_cached` cached positions attends as query rows;
    `sharers`: the other rows of the step whose tables start with the same prefix_key."""
    return (sharers > 0 and num_new_tokens <= CHUNK_QUERY_ROWS_MAX_TOKENS
            and num_cached >= CHUNK_QUERY_ROWS_MIN_BLOCKS * block_size)


@dataclass(slots=True)
class SharedPrefixGroups:
    """The shared-prefix groups of one step's query rows."""

    rows: list[list[int]]  # the query rows of each group
    shared_blocks: list[int]  # leading block-table entries each group's rows share
    encoded: torch.Tensor  # int64 [num_groups, offsets..., shared_blocks..., rows...] for the C kernel
    kv_tokens_saved: int  # per layer: sum over groups of (rows - 1) x shared tokens, reads not repeated
    # the torch path only:
    prefix_slots: list[torch.Tensor] | None = None  # [shared tokens] cache slots of each group's prefix
    suffix_slots: torch.Tensor | None = None  # [rows, L] slots past each row's shared prefix, null-padded
    suffix_mask: torch.Tensor | None = None  # [rows, 1, 1, L] bool, True = attend


def find_groups(tables: list[tuple[int, ...]], ctx_lens: list[int], block_size: int, min_rows: int | None = None,
                min_blocks: int | None = None, min_reads: int | None = None) -> list[tuple[list[int], int]]:
    """(rows, shared blocks) of each group among query rows with these block tables and context lengths:
    at least `min_rows` rows (default MIN_GROUP_ROWS) sharing at least `min_blocks` blocks (default
    MIN_SHARED_BLOCKS), rows x shared blocks at least `min_reads` (default MIN_GROUP_BLOCK_READS). A row may
    share only blocks before the one holding its last context position (what it writes this step, or a
    neighbouring speculative row writes)."""
    min_rows = MIN_GROUP_ROWS if min_rows is None else min_rows
    min_blocks = MIN_SHARED_BLOCKS if min_blocks is None else min_blocks
    min_reads = MIN_GROUP_BLOCK_READS if min_reads is None else min_reads
    limit = [min(len(t), (n - 1) // block_size) for t, n in zip(tables, ctx_lens)]

    def best(rows: list[int], depth: int) -> tuple[int, list[tuple[list[int], int]]]:
        """The most block reads saved among `rows` (which share their first `depth` blocks), and how."""
        cap = min(limit[r] for r in rows)
        common = len(os.path.commonprefix([tables[r][:cap] for r in rows]))
        grouped = len(rows) >= min_rows and common >= min_blocks and len(rows) * common >= min_reads
        whole = (len(rows) - 1) * common if grouped else 0
        plan = [(rows, common)] if whole else []
        deeper = [r for r in rows if limit[r] > common]
        if len(deeper) < min_rows:
            return whole, plan
        buckets: dict[int, list[int]] = {}
        for r in deeper:
            buckets.setdefault(tables[r][common], []).append(r)
        split, split_plan = 0, []
        for bucket in buckets.values():
            if len(bucket) >= min_rows:
                saved, sub = best(bucket, common + 1)
                split += saved
                split_plan += sub
        return (split, split_plan) if split > whole else (whole, plan)

    top: dict[int, list[int]] = {}
    for r, t in enumerate(tables):
        if limit[r] >= min_blocks:
            top.setdefault(t[0], []).append(r)
    groups: list[tuple[list[int], int]] = []
    for rows in top.values():
        if len(rows) >= min_rows:
            groups += best(rows, 1)[1]
    return groups


def plan_shared_prefix(tables: list[tuple[int, ...]], ctx_lens: list[int], block_size: int,
                       table: torch.Tensor | None = None, lens: torch.Tensor | None = None,
                       null_slot: int | None = None, device: torch.device | None = None,
                       min_rows: int | None = None, min_blocks: int | None = None,
                       min_reads: int | None = None) -> SharedPrefixGroups | None:
    """The step's groups (None when there are none; minimums as find_groups). With `table` ([rows,
    max_blocks] int64, padded), `lens` ([rows]) and `null_slot`, also the slots the torch path gathers."""
    groups = find_groups(tables, ctx_lens, block_size, min_rows, min_blocks, min_reads)
    if not groups:
        return None
    rows = [g for g, _ in groups]
    shared = [s for _, s in groups]
    offsets = [0]
    for g in rows:
        offsets.append(offsets[-1] + len(g))
    encoded = torch.tensor([len(rows), *offsets, *shared, *(r for g in rows for r in g)], dtype=torch.int64)
    saved = sum((len(g) - 1) * s * block_size for g, s in groups)
    plan = SharedPrefixGroups(rows, shared, encoded, saved)
    if table is not None:
        arange = torch.arange(block_size)
        plan.prefix_slots = [(table[g[0], :s].unsqueeze(-1) * block_size + arange).reshape(-1).to(device)
                             for g, s in groups]
        start = torch.zeros(len(tables), dtype=torch.long)
        for g, s in groups:
            start[g] = s * block_size
        width = int((lens - start).max())
        pos = start.unsqueeze(1) + torch.arange(width)  # [rows, L] context positions past the prefix
        valid = pos < lens.unsqueeze(1)
        pos = torch.where(valid, pos, 0)
        slots = table.gather(1, pos // block_size) * block_size + pos % block_size
        plan.suffix_slots = torch.where(valid, slots, null_slot).to(device)
        plan.suffix_mask = valid.view(len(tables), 1, 1, width).to(device)
    return plan


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float32 with its log-sum-exp: q [..., M, D], k/v [..., L, D], mask broadcast
    to [..., M, L] (True = attend) -> (out [..., M, D], lse [..., M])."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out, lse


def cascade_query_attention(q: torch.Tensor, plan: SharedPrefixGroups, read, scale: float) -> torch.Tensor:
    """Attention of the query rows q [rows, Hq, D] with shared-prefix groups, in torch.

    `read(slots, value)` returns the key (value=False) or value cache rows [*slots.shape, Hkv, D] at
    `slots`. Each group's
    prefix is read once for all its queries; every row's own part is read per row; the two partial
    results are combined by their log-sum-exps. Returns [rows, Hq, D] in q's dtype."""
    nd, num_heads, head_dim = q.shape
    # suffixes: each row against its own part, the query heads of a KV head along the query axis
    ks = read(plan.suffix_slots, False).transpose(1, 2)  # [rows, Hkv, L, D]
    vs = read(plan.suffix_slots, True).transpose(1, 2)
    kv_heads = ks.shape[1]
    group = num_heads // kv_heads
    qd = q.reshape(nd, kv_heads, group, head_dim)
    out_s, lse_s = _attend(qd, ks, vs, scale, plan.suffix_mask)  # [rows, Hkv, G, D], [rows, Hkv, G]
    out = out_s.reshape(nd, num_heads, head_dim)
    lse = lse_s.reshape(nd, num_heads)
    for rows, slots in zip(plan.rows, plan.prefix_slots):
        r = len(rows)
        index = torch.tensor(rows, device=q.device)
        kp = read(slots, False).transpose(0, 1)  # [Hkv, S, D]: the shared blocks, once
        vp = read(slots, True).transpose(0, 1)
        qg = q[index].reshape(r, kv_heads, group, head_dim).permute(1, 0, 2, 3).reshape(kv_heads, r * group, head_dim)
        out_p, lse_p = _attend(qg, kp, vp, scale)  # [Hkv, R*G, D], [Hkv, R*G]
        out_p = out_p.reshape(kv_heads, r, group, head_dim).permute(1, 0, 2, 3).reshape(r, num_heads, head_dim)
        lse_p = lse_p.reshape(kv_heads, r, group).permute(1, 0, 2).reshape(r, num_heads)
        total = torch.logaddexp(lse_p, lse[index])
        out[index] = (out_p * torch.exp(lse_p - total).unsqueeze(-1)
                      + out[index] * torch.exp(lse[index] - total).unsqueeze(-1))
    return out.to(q.dtype)
