"""int8 g32 weights (GGUF Q8_0's layout) in kernels/int8_rows16.c's tiles: sixteen rows' 32-weight block, then
their scales.

The int8 counterpart of fuselm/quant/int4_rows16.py: on CPU with AVX512_VNNI or AVX2 the C MoE path (GroupedExperts)
and the dense quantised projections (QuantLinear) repack their int8 g32 weights into these tiles once at load,
and the tiles replace the QuantWeight's rows and scales (one copy). What else reads them (the torch reference
path, memory accounting, the plan line) goes through `Int8Rows16`, which answers like the QuantWeight it came
from: `rows` unpacks a range of rows back into one, `dequantize` the whole weight.

A tile, for rows 16g..16g+15 and block b (weights 32b..32b+31), uint8:

    [0, 512)    vector v (64 bytes), int32 lane r: row r's weights 4v..4v+3 (v < 4) or 16+4(v-4)..16+4(v-4)+3
                (v >= 4) of the block, each stored as the unsigned byte q + 128
    [512, ...)  the sixteen rows' scales of block b (float16 or float32)

tiles: uint8 [N / 16, K / 32, tile_bytes], the groups of rows in order, so the rows of expert e of a
stacked weight (N a multiple of 16 per expert) are one contiguous run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fuselm.quant.formats import QuantWeight
from fuselm.quant.int4_rows16 import TILE_ROWS, TiledWeight


def tile_bytes(scale_dtype: torch.dtype) -> int:
    return 512 + TILE_ROWS * (2 if scale_dtype == torch.float16 else 4)


def fits(q: QuantWeight, rows_per_expert: int) -> bool:
    """Whether the tile kernel takes this weight: int8 in groups of 32 with float16/float32 scales, whole groups of
    sixteen rows per expert (K a multiple of 32: every int8 g32 weight)."""
    return (q.bits == 8 and q.group_size == 32 and q.scales.dtype in (torch.float16, torch.float32)
            and rows_per_expert % TILE_ROWS == 0 and q.qweight.device.type == "cpu")


@dataclass
class Int8Rows16(TiledWeight):
    shape: tuple[int, int]  # (out_features, in_features) of the full-precision weight
    scale_dtype: torch.dtype
    tiles: torch.Tensor  # uint8 [N / 16, K / 32, tile_bytes]
    source: str = "rtn"
    bits: int = 8
    group_size: int = 32

    @classmethod
    def pack(cls, q: QuantWeight) -> Int8Rows16:
        n, k = q.shape
        groups, blocks = n // TILE_ROWS, k // 32
        biased = q.qweight.view(torch.uint8) ^ 0x80  # q + 128 as an unsigned byte
        # [group, row, block, half, v, byte] -> [group, block, half, v, row, byte]
        weights = biased.reshape(groups, TILE_ROWS, blocks, 2, 4, 4).permute(0, 2, 3, 4, 1, 5).reshape(
            groups, blocks, 512)
        scales = q.scales.reshape(groups, TILE_ROWS, blocks).transpose(1, 2).contiguous().view(torch.uint8)
        return cls((n, k), q.scales.dtype, torch.cat([weights, scales], dim=2).contiguous(), q.source)

    def rows(self, start: int, stop: int) -> QuantWeight:
        """Rows [start, stop) (multiples of 16) as a plain QuantWeight (a copy)."""
        k, blocks = self.shape[1], self.shape[1] // 32
        size = 2 if self.scale_dtype == torch.float16 else 4
        part = self.tiles[start // TILE_ROWS:stop // TILE_ROWS]
        groups, n = part.shape[0], stop - start
        biased = part[:, :, :512].reshape(groups, blocks, 2, 4, TILE_ROWS, 4).permute(0, 4, 1, 2, 3, 5)
        qweight = (biased.reshape(n, k) ^ 0x80).view(torch.int8)
        raw = part[:, :, 512:512 + TILE_ROWS * size].contiguous().view(self.scale_dtype)
        scales = raw.transpose(1, 2).reshape(n, blocks)
        return QuantWeight(8, 32, (n, k), qweight.contiguous(), scales.contiguous(), None, self.source)

    def take(self, index: torch.Tensor) -> QuantWeight:
        k, n = self.shape[1], index.numel()
        biased = self.lanes(index, torch.int32, 0, 8).view(torch.uint8).reshape(n, k)  # eight vectors of bytes
        scales = self.lanes(index, self.scale_dtype, 512 // self.scale_dtype.itemsize, 1).reshape(n, -1)
        return QuantWeight(8, 32, (n, k), (biased ^ 0x80).view(torch.int8), scales, None, self.source)
