"""QuantWeight: a linear layer's weight kept quantised, and round-to-nearest quantisers for it.

Two formats, both read by fuselm/kernels/quant_linear.c (its header has the byte layout):
- int4: asymmetric, groups of G (32/64/128) along the input dimension; weight = q * scale + min
  with q in 0..15, two weights per byte (a 32-weight run is 16 bytes: weights j and j + 16 share
  byte j). GGUF Q4_0, Q4_1 and Q4_K are this format exactly.
- int8: symmetric, weight = q * scale with q in -127..127 (GGUF Q6_K uses -32..31), one scale per
  output channel (G = in_features) or per group of 16/32 (GGUF Q6_K / Q8_0).
Scales and mins are float16 (as GGUF stores them; half the bytes) or float32 where a format's
products of two scales need it to stay exact (Q4_K, Q6_K) or the values overflow float16.

`dequantize()` is the reference everything is tested against: float32 `q * scale + min`, the same
arithmetic as `gguf.quants.dequantize`, so a GGUF tensor kept in this form is bit-for-bit the
tensor gguf would give.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP_SIZES = (32, 64, 128)
_FP16_MAX = 65504.0


@dataclass
class QuantWeight:
    bits: int  # 4 or 8
    group_size: int  # weights per scale along the input dimension
    shape: tuple[int, int]  # (out_features, in_features) of the full-precision weight
    qweight: torch.Tensor  # int4: uint8 [N, K/2] (packed nibbles); int8: int8 [N, K]
    scales: torch.Tensor  # [N, K / group_size], float16 or float32
    mins: torch.Tensor | None  # int4 only: like scales
    source: str = "rtn"  # how it was made: "rtn" (round to nearest at load time) or "gguf:<type>"

    def __post_init__(self) -> None:
        n, k = self.shape
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        unit = 32 if self.bits == 4 else 16
        if self.group_size % unit or k % self.group_size:
            raise ValueError(f"int{self.bits} needs a group size that is a multiple of {unit} and divides "
                             f"in_features={k}; got group size {self.group_size}")
        want_q = (n, k // 2) if self.bits == 4 else (n, k)
        if tuple(self.qweight.shape) != want_q or tuple(self.scales.shape) != (n, k // self.group_size):
            raise ValueError(f"quantised tensors {tuple(self.qweight.shape)} / {tuple(self.scales.shape)} do not fit "
                             f"a [{n}, {k}] weight with group size {self.group_size}")
        if (self.mins is None) != (self.bits == 8):
            raise ValueError("int4 weights need mins and int8 weights have none")

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def format_key(self) -> tuple:
        """Weights with equal keys can be stacked along the output dimension into one matmul."""
        return self.bits, self.group_size, self.scales.dtype

    def unpacked(self) -> torch.Tensor:
        """The integer levels, [N, K] (uint8 0..15 for int4, int8 for int8)."""
        if self.bits == 8:
            return self.qweight
        n, k = self.shape
        b = self.qweight.view(n, k // 32, 16)
        return torch.stack((b & 0x0F, b >> 4), dim=2).reshape(n, k)  # [N, K/32, 2, 16] -> [N, K]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] weight: float32 q * scale (+ min), then cast to dtype."""
        n, k = self.shape
        q = self.unpacked().float().view(n, -1, self.group_size)
        w = q * self.scales.float().unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins.float().unsqueeze(-1)
        return w.view(n, k).to(dtype)

    def rows(self, index: torch.Tensor) -> QuantWeight:
        """The weight with its output rows reordered/selected by `index` (undoing GGUF's q/k order)."""
        return QuantWeight(self.bits, self.group_size, (len(index), self.shape[1]), self.qweight[index].contiguous(),
                           self.scales[index].contiguous(), None if self.mins is None else self.mins[index].contiguous(),
                           self.source)

    def to(self, device: torch.device | str) -> QuantWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantWeight(self.bits, self.group_size, self.shape, move(self.qweight), move(self.scales),
                           move(self.mins), self.source)


def stack_rows(parts: list[QuantWeight]) -> QuantWeight:
    """Concatenate weights of one format along the output dimension (q/k/v -> qkv, gate/up)."""
    first = parts[0]
    if any(p.format_key() != first.format_key() or p.in_features != first.in_features for p in parts):
        raise ValueError("only weights of one format and input size can be stacked")
    cat = lambda ts: torch.cat(ts).contiguous()  # noqa: E731
    mins = None if first.mins is None else cat([p.mins for p in parts])
    return QuantWeight(first.bits, first.group_size, (sum(p.out_features for p in parts), first.in_features),
                       cat([p.qweight for p in parts]), cat([p.scales for p in parts]), mins, first.source)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 levels 0..15, [N, K] (K % 32 == 0) -> [N, K/2] bytes in the int4 layout."""
    n, k = q.shape
    q = q.to(torch.uint8).view(n, k // 32, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def _scale_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float16 if all(t.abs().max().item() < _FP16_MAX for t in tensors) else torch.float32


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> QuantWeight:
    """Symmetric int8 per output channel (group_size None or -1) or per group, round to nearest.
    Grouped scales are stored as float16 (half the bytes, Q8_0's choice) when they fit."""
    n, k = weight.shape
    grouped = group_size not in (None, -1)  # even a layer one group wide: a tensor-parallel rank's slice
    g = group_size if grouped else k
    w = weight.detach().float().reshape(n, k // g, g)
    scale = w.abs().amax(dim=-1) / 127.0  # [N, K/G]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale gives q = 0
    if grouped and _scale_dtype(scale) == torch.float16:
        scale = scale.half().float()  # levels from the stored scale
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).reshape(n, k)
    stored = scale.half() if grouped and _scale_dtype(scale) == torch.float16 else scale
    return QuantWeight(8, g, (n, k), q.contiguous(), stored.contiguous(), None)


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> QuantWeight:
    """Asymmetric int4 per group of group_size input weights, round to nearest.

    The min and scale are rounded to their storage dtype first and the levels computed from the
    rounded values, so storage rounding does not add to the quantisation error."""
    n, k = weight.shape
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"in_features={k} is not a multiple of the int4 group size {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, K/G]
    sdt = _scale_dtype(lo, hi)
    mins = lo.to(sdt)
    scale = ((hi - mins.float()) / 15.0).to(sdt)
    s = scale.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((w - mins.float().unsqueeze(-1)) / safe).clamp(0, 15).reshape(n, k)
    return QuantWeight(4, group_size, (n, k), pack_nibbles(q), scale.contiguous(), mins.contiguous())


def fit_group_size(method: str, group_size: int | None, in_features: int) -> int:
    """The group size a layer gets: the requested one (int4 32, int8 32 by default; -1 = per channel
    for int8) if it divides in_features, else the largest of 128/64/32 below it that does."""
    if method == "int8" and group_size == -1:
        return in_features
    want = group_size or 32
    if in_features % want == 0:
        return want
    for g in (128, 64, 32, 16):
        if g < want and in_features % g == 0 and (method == "int8" or g >= 32):
            return g
    raise ValueError(f"in_features={in_features} has no {method} group size (multiple of 32) dividing it")


def quantize(weight: torch.Tensor, method: str, group_size: int | None = None) -> QuantWeight:
    """Round-to-nearest `method` quantisation with the group size fit_group_size() picks."""
    group = fit_group_size(method, group_size, weight.shape[1])
    if method == "int8":
        return quantize_int8(weight, -1 if group_size == -1 else group)
    if method == "int4":
        return quantize_int4(weight, group)
    raise ValueError(f"unknown quantization {method!r}; use int8 or int4")
