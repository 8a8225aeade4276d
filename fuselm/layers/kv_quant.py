"""int8 KV cache: each cached key/value row stored as int8 with one scale per token and head.

A KV row of one head (head_dim values) is quantised symmetrically: scale = max|x| / 127, stored in
bfloat16, and x / scale rounded to int8 (the division uses the rounded scale, so dequantising
q * scale has only the int8 rounding error). Per-token scales need no calibration and suit keys
and values alike; the cache then costs head_dim + 2 bytes per head and token instead of
2 * head_dim (bf16) or 4 * head_dim (fp32), so the same memory holds 1.9x / 3.8x the tokens at
head_dim 64. Attention dequantises the rows it reads.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.bfloat16
_TINY = 1e-30  # an all-zero row gets this scale instead of 0, so x / scale stays finite


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], scale [...] bfloat16) with x ~= q * scale."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / 127.0).clamp_min_(_TINY).to(SCALE_DTYPE)  # [...]
    q = torch.round(xf / scale.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)  # [..., D]
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., D] and scale [...] -> [..., D] in `dtype`."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)
