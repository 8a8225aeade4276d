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

    def read(self, block_ids: list[int], into: torch.Tensor, rows: list[int] | None = None) -> None:
        """Copy blocks `block_ids` into rows `rows` (default 0..n-1) of `into`, a [*, block_bytes] uint8
        tensor: one gather per cache tensor for all the blocks, not one copy per block and tensor."""
        ids = torch.tensor(block_ids)
        target = torch.tensor(rows) if rows is not None else torch.arange(len(block_ids))
        offset = 0
        for tensor, size in zip(self.tensors, self.sizes):
            picked = tensor.index_select(0, ids).view(len(block_ids), -1).view(torch.uint8)
            into[:, offset:offset + size].index_copy_(0, target, picked)
            offset += size

    def write(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Fill blocks `block_ids` from the rows of `data`, a [n, block_bytes] uint8 tensor."""
        ids = torch.tensor(block_ids)
        offset = 0
        for tensor, size in zip(self.tensors, self.sizes):
            part = data[:, offset:offset + size].contiguous().view(tensor.dtype).view(len(block_ids), *tensor.shape[1:])
            tensor.index_copy_(0, ids, part)
            offset += size


def prompt_block_hashes(kv_manager, token_ids: list[int]) -> list[int]:
    """The hash of each full block a prompt's prefix-cache lookup can hit (all but its last token)."""
    probe = Request("kv-transfer-probe", None, token_ids, SamplingParams(max_tokens=1), 1, arrival_seq=0)
    num_blocks = (len(token_ids) - 1) // kv_manager.block_size
    kv_manager._hash_full_blocks(probe, num_blocks * kv_manager.block_size)
    return probe.block_hashes[:num_blocks]
