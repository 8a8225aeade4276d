"""StreamingLLM with rotary positions in the cache (`"positions": "cache"`, as the paper does): a
request's keys and queries take their cache index as position, p - kv_offset, instead of their
position p in the text, so the distance from a query to the attention sinks stays within
sinks + window + one block however long the stream runs.

Rotary is a rotation: rotating a key stored at position e by -d gives exactly the key at e - d. When
eviction (core/kv_eviction.evict_streaming) drops d positions between the sinks and the window, the
window's keys move d cache indices down; before the request's next step the runner rotates them by
-d, so every key again sits at its cache index (the sinks never move). The runner remembers per
sequence the offset its keys reflect; a sequence starting at token 0 (new, or recomputed after a
preemption) starts from 0. An int8 cache is dequantised, rotated and quantised again.

A prompt chunk's tokens take their cache index at the start of the step: a query later in a chunk
that spans an eviction sees the sinks as far as the chunk's first query does, up to one chunk
further than a token-by-token run would place them (a prompt within sinks + window is exact).
"""

from __future__ import annotations

import torch

from fuselm.layers.kv_quant import dequantize_rows, quantize_rows


class CachePositions:
    def __init__(self) -> None:
        self.applied: dict[int, int] = {}  # seq_id -> the kv_offset its cached keys are rotated for

    def rerotate(self, rows, attention_layers: list, rope, block_size: int, slots_of) -> None:
        """Rotate the window keys of every cache-position row whose offset moved since its last step.
        rope: the model's RotaryEmbedding; slots_of(block_ids, start, end): cache slots of indices."""
        for r in rows:
            if not r.cache_positions:
                continue
            if r.num_computed_tokens == 0:
                self.applied[r.seq_id] = 0
            shift = r.kv_offset - self.applied.get(r.seq_id, 0)
            self.applied[r.seq_id] = r.kv_offset
            sink_tokens = -(-r.kv_window[0] // block_size) * block_size
            entries = r.num_computed_tokens - r.kv_offset
            if shift == 0 or entries <= sink_tokens:
                continue
            slots = slots_of(r.block_ids, sink_tokens, entries).to(rope.cos.device)
            cos, signed_sin = rope.tables(torch.tensor([shift], device=rope.cos.device))  # [1, 1, D]
            for attn in attention_layers:
                kv_heads, head_dim = attn.k_cache.shape[-2:]
                flat = attn.k_cache.view(-1, kv_heads, head_dim)
                scales = None if attn.k_scale is None else attn.k_scale.view(-1, kv_heads)
                keys = flat[slots].float() if scales is None else dequantize_rows(flat[slots], scales[slots], torch.float32)
                back = rope.apply(keys, cos.float(), -signed_sin.float())  # rotated by -shift
                if scales is None:
                    flat[slots] = back.to(flat.dtype)
                else:
                    q, s = quantize_rows(back)
                    flat[slots], scales[slots] = q, s

    def release(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self.applied.pop(seq_id, None)
