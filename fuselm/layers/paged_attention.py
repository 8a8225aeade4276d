"""Attention over the paged KV cache for one packed batch (portable torch: CPU and CUDA).

The packed batch puts every request's scheduled tokens in one 1-D token list. The runner puts
"query rows" first: every single-token row (a decode), then each token of a short multi-token row
(speculative tokens being verified, a tiny prompt chunk) as a query row of its own whose context
ends at its own position. Query rows are attended to together: on CPU by a C kernel that reads
the paged cache in place (fuselm/kernels), elsewhere (and as the reference) by one batched SDPA
call over their gathered, padded contexts. Long multi-token rows (prompt chunks) follow; each gets
one SDPA call over its cached prefix plus its new tokens, causal inside the chunk.

The batch metadata reaches every layer through a module-level "forward context" set by the runner
around the model call, so the model code does not thread it through each layer.

A sliding-window layer (`window=W`) lets the query at position p see positions p-W+1..p only:
the query rows' padded mask and each prompt chunk's mask leave out what lies before the window,
and a chunk reads only the context slots its window can reach; the C decode kernel takes each query
row's first position (its context length minus the window) and starts reading there. A model with
windowed layers keeps one block table per KV cache group (core/kv_groups.py): a layer reads the
metadata of its group, whose tables hold the null block where the window has moved on.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fuselm.layers.cascade import SharedPrefixGroups, cascade_query_attention
from fuselm.layers.kv_quant import dequantize_rows, quantize_rows
from fuselm.layers.h2o_scores import capture_h2o_scores
from fuselm.layers.snapkv_scores import capture_scores


@dataclass(slots=True)
class PrefillRow:
    """One multi-token row of the packed batch."""

    start: int  # first token of the row in the packed batch
    end: int
    num_cached: int  # tokens of this request already in the KV cache before this step
    context_slots: torch.Tensor | None  # [num_cached + (end - start)] slots of the whole context; None if num_cached == 0
    # a streaming request's mask [end - start, num_cached + end - start] (float: 0 attend, -inf not); None for a
    # plain causal row, whose mask the torch path builds where it needs one (prefill_row_causal_mask)
    causal_mask: torch.Tensor | None


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot of every new token
    num_query_rows: int  # tokens 0..num_query_rows-1 are query rows (one query, context up to itself)
    prefill_rows: list[PrefillRow]
    # Query rows 0..num_single_rows-1 are single-token rows: the C kernel stores their K/V itself.
    # The rest belong to short multi-token rows, whose K/V must be in the cache before any is read.
    num_single_rows: int = -1  # -1: all query rows are single-token rows
    # Decode rows, for the CPU kernel (reads the cache in place):
    decode_block_table: torch.Tensor | None = None  # [num_decodes, max_blocks] int64
    decode_ctx_lens: torch.Tensor | None = None  # [num_decodes] int64
    # Decode rows, for the portable torch path (gathers a padded copy):
    decode_context_slots: torch.Tensor | None = None  # [num_decodes, max_context] int64 (padding -> null slot)
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_context] bool, True = attend
    cpu_kernels: object | None = None  # fuselm.kernels.cpu.CpuKernels when the kernel path is on
    # prompt chunks through kernels/chunk_attention.c where it takes them (with cpu_kernels), else torch SDPA: the
    # execution plan's `chunks`, timed per machine (runner/kernel_choice.py choose_chunk_attention)
    chunk_kernel: bool = True
    # masks and start positions built once per step and shared by the layers that need them (of one window size)
    window_masks: dict = field(default_factory=dict)
    # with several KV cache groups (core/kv_groups.py): every group's metadata, this one first
    groups: list | None = None
    # rows ending their prefill under SnapKV: each layer adds its scores (runner/kv_compaction.py)
    snapkv: list | None = None
    # rows of H2O requests: each layer adds its attention weights (runner/h2o_compaction.py)
    h2o: list | None = None
    # query rows that share leading blocks, attended to as groups (layers/cascade.py); None: no group
    cascade: SharedPrefixGroups | None = None
    # query rows that are prompt-chunk tokens (layers/cascade.py chunk_as_query_rows): the step's matmuls
    # are a prompt chunk's, so the model takes its prompt-step path, with these rows' attention in C
    chunk_query_rows: int = 0


# Per thread: several engines may share a process (a server beside a router, tests that start a
# prefill and a decode instance), each stepping on its own thread.
_local = threading.local()


@contextmanager
def forward_context(metadata: AttentionMetadata):
    previous = getattr(_local, "current", None)
    _local.current = metadata
    try:
        yield
    finally:
        _local.current = previous


def get_attention_metadata(group: int = 0) -> AttentionMetadata:
    """The step's attention metadata for the layers of KV cache group `group`."""
    current = getattr(_local, "current", None)
    assert current is not None, "attention called outside forward_context()"
    return current if group == 0 else current.groups[group]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Scatter new keys/values into their cache slots. k_cache: [num_blocks, block_size, kv_heads, head_dim].

    An int8 cache comes with k_scale/v_scale [num_blocks, block_size, kv_heads]: rows are quantised
    on the way in (layers/kv_quant.py).
    """
    kv_heads, head_dim = k_cache.shape[-2:]
    for cache, scales, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        if scales is None:
            cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, x.to(cache.dtype))
        else:
            q, s = quantize_rows(x)
            cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, q)
            scales.view(-1, kv_heads).index_copy_(0, slot_mapping, s)


def read_kv(flat: torch.Tensor, flat_scale: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of a flattened cache [slots, kv_heads, head_dim] at `slots` (any shape), in `dtype`."""
    if flat_scale is None:
        return flat[slots].to(dtype)
    return dequantize_rows(flat[slots], flat_scale[slots], dtype)


def query_rows_window_mask(meta: AttentionMetadata, window: int) -> torch.Tensor:
    """The query rows' mask [nd, 1, 1, L] (True = attend) restricted to the last `window` positions of each row."""
    key = ("query", window)
    if key not in meta.window_masks:
        valid = meta.decode_mask  # [nd, 1, 1, L]: position < context length
        lens = valid.sum(-1, keepdim=True)  # [nd, 1, 1, 1]
        pos = torch.arange(valid.shape[-1], device=valid.device)  # [L]
        meta.window_masks[key] = valid & (pos >= lens - window)
    return meta.window_masks[key]


def query_rows_window_starts(meta: AttentionMetadata, window: int) -> torch.Tensor:
    """The first position each query row's window reaches: [nd] int64 (the C kernel's start positions)."""
    key = ("starts", window)
    if key not in meta.window_masks:
        meta.window_masks[key] = (meta.decode_ctx_lens - window).clamp_min_(0)
    return meta.window_masks[key]


def chunk_causal_allowed(num_cached: int, n: int) -> torch.Tensor:
    """[n, num_cached + n] bool: the chunk's position num_cached + i sees context positions 0 .. num_cached + i."""
    return torch.arange(num_cached + n).unsqueeze(0) <= torch.arange(num_cached, num_cached + n).unsqueeze(1)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's float attn_mask for a bool one: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def prefill_row_window(meta: AttentionMetadata, index: int, row: PrefillRow, window: int,
                       dtype: torch.dtype) -> tuple[int, torch.Tensor | None]:
    """(first context position the row's window reaches, float mask [n, ctx - first] or None for plain
    causal) for prompt chunk `index` of the step under a sliding window."""
    key = ("prefill", index, window)
    if key not in meta.window_masks:
        n, c = row.end - row.start, row.num_cached
        first = max(0, c + 1 - window)  # the chunk's first query (position c) sees back to c - window + 1
        if c == 0 and n <= window:
            meta.window_masks[key] = (0, None)  # the window never cuts: plain causal
        else:
            q_pos = torch.arange(c, c + n).unsqueeze(1)  # [n, 1]
            k_pos = torch.arange(first, c + n).unsqueeze(0)  # [1, ctx - first]
            allowed = (k_pos <= q_pos) & (k_pos > q_pos - window)  # [n, ctx - first]
            meta.window_masks[key] = (first, additive_mask(allowed, dtype).to(meta.slot_mapping.device))
    return meta.window_masks[key]


def prefill_row_causal_mask(meta: AttentionMetadata, index: int, row: PrefillRow, dtype: torch.dtype) -> torch.Tensor:
    """Prompt chunk `index`'s plain causal mask over its context, float [n, num_cached + n]: 0 attend, -inf not."""
    key = ("causal", index)
    if key not in meta.window_masks:
        mask = additive_mask(chunk_causal_allowed(row.num_cached, row.end - row.start), dtype)
        meta.window_masks[key] = mask.to(meta.slot_mapping.device)
    return meta.window_masks[key]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, scale: float, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, window: int | None = None, kv_group: int = 0) -> torch.Tensor:
    """q: [T, Hq, D], k/v: [T, Hkv, D] for the new tokens. Returns [T, Hq, D].

    k_scale/v_scale: the per-token, per-head scales of an int8 cache (None otherwise).
    window: a sliding-window layer's window in positions (None: the whole context).
    kv_group: the layer's KV cache group (its block tables; core/kv_groups.py).
    """
    meta = get_attention_metadata(kv_group)
    nd = meta.num_query_rows
    nw = nd if meta.num_single_rows < 0 else meta.num_single_rows
    kernel_writes = nd and meta.cpu_kernels is not None  # the C kernel stores the single rows' K/V itself
    if kernel_writes:
        if nw < k.shape[0]:
            write_kv(k_cache, v_cache, k[nw:], v[nw:], meta.slot_mapping[nw:], k_scale, v_scale)
    else:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    out = q.new_empty(q.shape)  # [T, Hq, D], contiguous
    flat_k = k_cache.view(-1, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    flat_ks = k_scale.view(-1, kv_heads) if k_scale is not None else None
    flat_vs = v_scale.view(-1, kv_heads) if v_scale is not None else None

    if kernel_writes and meta.cascade is not None and window is None:
        meta.cpu_kernels.cascade_attention(q[:nd].contiguous(), out[:nd], k_cache, v_cache, meta.decode_block_table,
                                           meta.decode_ctx_lens, scale, meta.cascade.encoded, k[:nw], v[:nw],
                                           k_scale, v_scale)
    elif kernel_writes:
        starts = None if window is None else query_rows_window_starts(meta, window)
        meta.cpu_kernels.paged_decode_attention(q[:nd].contiguous(), out[:nd], k_cache, v_cache,
                                                meta.decode_block_table, meta.decode_ctx_lens, scale, k[:nw], v[:nw],
                                                k_scale, v_scale, ctx_starts=starts)
    elif nd and meta.cascade is not None and window is None:
        out[:nd] = cascade_query_attention(
            q[:nd], meta.cascade, lambda slots, value: read_kv(flat_v if value else flat_k, flat_vs if value else flat_ks,
                                                              slots, q.dtype), scale)
    elif nd:
        # Each query row has one query per head; put a KV head's `group` query heads on the
        # sequence axis so GQA needs no repeat: q [nd, Hkv, group, D] against k [nd, Hkv, L, D].
        qd = q[:nd].reshape(nd, kv_heads, group, head_dim)
        ctx_k = read_kv(flat_k, flat_ks, meta.decode_context_slots, q.dtype).transpose(1, 2)  # [nd, Hkv, L, D]
        ctx_v = read_kv(flat_v, flat_vs, meta.decode_context_slots, q.dtype).transpose(1, 2)  # [nd, Hkv, L, D]
        mask = meta.decode_mask if window is None else query_rows_window_mask(meta, window)  # [nd, 1, 1, L]
        od = F.scaled_dot_product_attention(qd, ctx_k, ctx_v, attn_mask=mask, scale=scale)
        out[:nd] = od.reshape(nd, num_heads, head_dim)

    # On CPU a chunk with a plain causal mask attends in C over the paged cache in place
    # (kernels/chunk_attention.c: 1.4-2x torch's SDPA at 32-512 tokens, no gathered copy or mask).
    chunk_kernel = (meta.chunk_kernel and meta.cpu_kernels is not None and window is None and meta.prefill_rows
                    and meta.cpu_kernels.chunk_attention_supports(q, k_cache))
    q_rows = q.contiguous() if chunk_kernel else q  # q may be a view into the fused q/k/v projection
    # Elsewhere, 4-D inputs ([1, H, n, D]) let torch pick its flash kernel on CPU; 3-D ones fall back to
    # the much slower math path (measured 3-5x).
    for index, row in enumerate(meta.prefill_rows):
        if chunk_kernel and row.causal_mask is None:
            slots = row.context_slots if row.context_slots is not None else meta.slot_mapping[row.start:row.end]
            meta.cpu_kernels.chunk_attention(q_rows[row.start:row.end], out[row.start:row.end], k_cache, v_cache, slots,
                                             row.num_cached, scale, k_scale, v_scale)
            continue
        qr = q[row.start:row.end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        first, window_mask = (0, None) if window is None else prefill_row_window(meta, index, row, window, q.dtype)
        if row.context_slots is None and window_mask is None:
            kr, vr = k[row.start:row.end], v[row.start:row.end]  # [n, Hkv, D]
            if k_scale is not None:  # attend to what the int8 cache holds, so chunking never changes results
                kr = dequantize_rows(*quantize_rows(kr), q.dtype)
                vr = dequantize_rows(*quantize_rows(vr), q.dtype)
            kr = kr.transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
            vr = vr.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=scale, enable_gqa=group > 1)
        else:
            slots = row.context_slots
            if slots is None:  # a first chunk longer than the window: its own new tokens are the context
                slots = meta.slot_mapping[row.start:row.end]
            slots = slots[first:]  # [ctx - first]: what the window reaches
            mask = window_mask
            if mask is None:
                mask = row.causal_mask if row.causal_mask is not None else prefill_row_causal_mask(meta, index, row, q.dtype)
            kr = read_kv(flat_k, flat_ks, slots, q.dtype).transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
            vr = read_kv(flat_v, flat_vs, slots, q.dtype).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        out[row.start:row.end] = o[0].transpose(0, 1)
    if meta.snapkv:
        capture_scores(meta.snapkv, q, flat_k, flat_ks, scale)
    if meta.h2o:
        capture_h2o_scores(meta.h2o, q, flat_k, flat_ks, scale)
    return out
