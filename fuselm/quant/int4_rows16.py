"""int4 g32 weights in kernels/int4_rows16.c's tiles: sixteen rows' 32-weight block, then their scales and mins.

On CPU with AVX512_VNNI the C MoE path (GroupedExperts) and the dense quantised projections (QuantLinear:
q/k/v, o, gate/up, down, an untied LM head) repack their int4 g32 weights into these tiles once at load, and
the tiles replace the QuantWeight's rows, scales and mins: one copy of the weights. What else reads them
(the torch reference path, memory accounting, the plan line) goes through `Int4Rows16`, which answers like
the QuantWeight it came from: `rows` unpacks a range of rows back into one, `dequantize` the whole weight.

A tile, for rows 16g..16g+15 and block b (weights 32b..32b+31), uint8:

    [0, 256)    vector v (64 bytes), int32 lane r: row r's packed bytes 4v..4v+3 of the block
    [256, ...)  the sixteen rows' scales of block b, then their mins (float16 or float32)

tiles: uint8 [N / 16, K / 32, tile_bytes], the groups of rows in order, so the rows of expert e of a
stacked weight (N a multiple of 16 per expert) are one contiguous run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fuselm.quant.formats import QuantWeight

TILE_ROWS = 16


def tile_bytes(scale_dtype: torch.dtype) -> int:
    return 256 + 2 * TILE_ROWS * (2 if scale_dtype == torch.float16 else 4)


def fits(q: QuantWeight, rows_per_expert: int, k_multiple: int = 128) -> bool:
    """Whether the tile kernel takes this weight: int4 in groups of 32 with float16/float32 scales and mins,
    whole groups of sixteen rows per expert, and K a multiple of `k_multiple`: 128 where the activations are
    prepared for quant_rows.c's rows as well (kernels/moe.c), 32 for a dense layer (quant_rows.c's split
    layout with a shorter last quad of blocks, which only the tiles read)."""
    return (q.bits == 4 and q.group_size == 32 and q.mins is not None
            and q.scales.dtype in (torch.float16, torch.float32) and q.mins.dtype == q.scales.dtype
            and rows_per_expert % TILE_ROWS == 0 and q.in_features % k_multiple == 0
            and q.qweight.device.type == "cpu")


@functools.lru_cache(maxsize=64)
def _lane_offsets(blocks: int, width: int, start: int, count: int) -> torch.Tensor:
    """[blocks, count]: where lane 0's element c of each block's tile lies, from its group's first tile."""
    return (torch.arange(blocks) * width).view(-1, 1) + start + (torch.arange(count) * TILE_ROWS).view(1, -1)


class TiledWeight:
    """What a weight in sixteen-row tiles (Int4Rows16, fuselm/quant/int8_rows16.py's Int8Rows16) answers like the
    QuantWeight it came from, given its `shape`, `tiles` and `rows`."""

    shape: tuple[int, int]
    tiles: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.tiles.numel()

    def rows(self, start: int, stop: int) -> QuantWeight:
        raise NotImplementedError

    def take(self, index: torch.Tensor) -> QuantWeight:
        """The rows `index` (any ids, any order) as a plain QuantWeight (a copy): a tied embedding table's lookup."""
        raise NotImplementedError

    def lanes(self, index: torch.Tensor, dtype: torch.dtype, start: int, count: int) -> torch.Tensor:
        """For the rows `index`, in every block's tile read as `dtype`: elements start + 16 c + r (c < count, r the
        row's lane: its 4-byte slice of each weight vector, or its scale): [len(index), blocks, count]."""
        elements = self.tiles.view(dtype)  # [N / 16, blocks, tile elements]
        _, blocks, width = elements.shape
        index = index.reshape(-1, 1, 1).long()
        return elements.reshape(-1)[index // TILE_ROWS * (blocks * width) + index % TILE_ROWS
                                    + _lane_offsets(blocks, width, start, count)]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.rows(0, self.shape[0]).dequantize(dtype)


@dataclass
class Int4Rows16(TiledWeight):
    shape: tuple[int, int]  # (out_features, in_features) of the full-precision weight
    scale_dtype: torch.dtype
    tiles: torch.Tensor  # uint8 [N / 16, K / 32, tile_bytes]
    source: str = "rtn"
    bits: int = 4
    group_size: int = 32

    @classmethod
    def pack(cls, q: QuantWeight) -> Int4Rows16:
        n, k = q.shape
        groups, blocks = n // TILE_ROWS, k // 32
        weights = q.qweight.reshape(groups, TILE_ROWS, blocks, 4, 4).permute(0, 2, 3, 1, 4).reshape(groups, blocks, 256)

        def per_tile(t: torch.Tensor) -> torch.Tensor:  # [N, blocks] -> bytes [groups, blocks, 16 * size]
            return t.reshape(groups, TILE_ROWS, blocks).transpose(1, 2).contiguous().view(torch.uint8)

        tiles = torch.cat([weights, per_tile(q.scales), per_tile(q.mins)], dim=2).contiguous()
        return cls((n, k), q.scales.dtype, tiles, q.source)

    def rows(self, start: int, stop: int) -> QuantWeight:
        """Rows [start, stop) (multiples of 16) as a plain QuantWeight (a copy)."""
        k, blocks, size = self.shape[1], self.shape[1] // 32, 2 if self.scale_dtype == torch.float16 else 4
        part = self.tiles[start // TILE_ROWS:stop // TILE_ROWS]
        groups, n = part.shape[0], stop - start
        qweight = part[:, :, :256].reshape(groups, blocks, 4, TILE_ROWS, 4).permute(0, 3, 1, 2, 4).reshape(n, k // 2)

        def per_row(offset: int) -> torch.Tensor:  # bytes [groups, blocks, 16 * size] -> [N, blocks]
            raw = part[:, :, offset:offset + TILE_ROWS * size].contiguous().view(self.scale_dtype)
            return raw.transpose(1, 2).reshape(n, blocks)

        return QuantWeight(4, 32, (n, k), qweight.contiguous(), per_row(256), per_row(256 + TILE_ROWS * size),
                           self.source)

    def take(self, index: torch.Tensor) -> QuantWeight:
        k, n, size = self.shape[1], index.numel(), self.scale_dtype.itemsize
        qweight = self.lanes(index, torch.int32, 0, 4).view(torch.uint8).reshape(n, k // 2)  # four vectors of bytes
        scales = self.lanes(index, self.scale_dtype, 256 // size, 1).reshape(n, -1)
        mins = self.lanes(index, self.scale_dtype, 256 // size + TILE_ROWS, 1).reshape(n, -1)
        return QuantWeight(4, 32, (n, k), qweight, scales, mins, self.source)
