"""A paged KV block as bytes: every layer's keys and values (and int8 scales) of one block id.

The runner keeps, per attention layer, k_cache and v_cache of shape [num_blocks + 1, block_size,
kv_heads, head_dim] (and for an int8 cache k_scale and v_scale of [num_blocks + 1, block_size,
kv_heads]). Block b of every one of these tensors, in that order, laid end to end, is the block's
wire form; both instances must agree on the layout (same model, KV dtype and block size), which
`BlockLayout.describe()` lets the receiver check before it accepts a single byte.

`prompt_block_hashes` computes a prompt's prefix-cache hash chain the way core/kv_cache.py does, so
a received block is registered under the hash the decode instance's own requests look up.
"""

from __future__ import annotations

import torch

from fuselm.core.request import Request
from fuselm.sampling_params import SamplingParams


class BlockLayout:
    def __init__(self, runner) -> None:
        self.tensors: list[torch.Tensor] = []
        for layer in runner.model.layers:
            attn = layer.self_attn
            for name in ("k_cache", "v_cache", "k_scale", "v_scale"):
                tensor = getattr(attn, name, None)
                if tensor is not None:
                    self.tensors.append(tensor)
        self.sizes = [t[0].numel() * t.element_size() for t in self.tensors]
        self.block_bytes = sum(self.sizes)
        self.block_size = runner.block_size

    def describe(self) -> dict:
        return {"block_bytes": self.block_bytes, "block_size": self.block_size,
                "tensors": [[list(t.shape[1:]), str(t.dtype)] for t in self.tensors]}

    def read(self, block_id: int, into: torch.Tensor) -> None:
        """Copy block `block_id` into `into`, a uint8 tensor of block_bytes."""
        offset = 0
        for tensor, size in zip(self.tensors, self.sizes):
            into[offset:offset + size].copy_(tensor[block_id].reshape(-1).view(torch.uint8))
            offset += size

    def write(self, block_id: int, data: torch.Tensor) -> None:
        """Fill block `block_id` from `data`, a uint8 tensor of block_bytes."""
        offset = 0
        for tensor, size in zip(self.tensors, self.sizes):
            tensor[block_id].view(-1).view(torch.uint8).copy_(data[offset:offset + size])
            offset += size


def prompt_block_hashes(kv_manager, token_ids: list[int]) -> list[int]:
    """The hash of each full block a prompt's prefix-cache lookup can hit (all but its last token)."""
    probe = Request("kv-transfer-probe", None, token_ids, SamplingParams(max_tokens=1), 1, arrival_seq=0)
    num_blocks = (len(token_ids) - 1) // kv_manager.block_size
    kv_manager._hash_full_blocks(probe, num_blocks * kv_manager.block_size)
    return probe.block_hashes[:num_blocks]
