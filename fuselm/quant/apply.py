"""Putting quantised weights into a model: GGUF tensors kept as they are, or round-to-nearest at load.

Two entry points, called by the ModelRunner:
- install_quantized(model, weights): before the model's parameters are allocated (still on the
  meta device), every projection whose checkpoint tensors are QuantWeights (a GGUF file's Q4/Q8
  tensors) becomes a QuantLinear and takes its tensors out of `weights`, so the full-precision
  weight is never allocated. Embeddings / LM head likewise.
- quantize_model(model, method, group_size, quantize_lm_head): after loading, every remaining
  float projection (TorchLinear) of the layers becomes a QuantLinear of `method` (int8 or int4, per
  group), and every MoE layer's float experts a stacked QuantWeight of the same method (each
  expert's rows quantised as that expert alone would be); the LM head and the embeddings become
  int8 per vocabulary row unless kept.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fuselm.layers.linear import TorchLinear
from fuselm.layers.moe import GroupedExperts
from fuselm.quant.formats import QuantWeight, quantize, quantize_int8
from fuselm.quant.linear import QuantEmbedding, QuantLinear

logger = logging.getLogger("fuselm")


def install_quantized(model: nn.Module, weights: dict, dtype: torch.dtype, device: torch.device) -> int:
    """Returns how many projections were installed quantised."""
    count = 0
    for parent, attr, names, bias_names in model.linear_sources():
        values = [weights.get(n) for n in names]
        quantised = [isinstance(v, QuantWeight) for v in values]
        if not any(quantised):
            continue
        if not all(quantised):  # a fused projection mixing float and quantised parts: run it in float
            for n, v in zip(names, values):
                if isinstance(v, QuantWeight):
                    weights[n] = v.dequantize(dtype)
            continue
        parts = [weights.pop(n).to(device) for n in names]
        bias = torch.cat([weights.pop(b) for b in bias_names]).to(device, dtype) if bias_names else None
        setattr(parent, attr, QuantLinear(parts, bias))
        count += 1
    tied = model.config.tie_word_embeddings
    embed = weights.get("model.embed_tokens.weight")
    if isinstance(embed, QuantWeight):
        embed = weights.pop("model.embed_tokens.weight").to(device)
        model.embed_tokens = QuantEmbedding(embed, dtype)
        if tied:
            model.lm_head = QuantLinear([embed], tied_embedding=model.embed_tokens)  # one weight for both
    head = weights.get("lm_head.weight")
    if isinstance(head, QuantWeight):
        head = weights.pop("lm_head.weight")
        if not tied:
            model.lm_head = QuantLinear([head.to(device)])
    return count


def quantize_model(model: nn.Module, method: str, group_size: int | None, quantize_lm_head: bool) -> int:
    """Round-to-nearest quantisation of every float projection. Returns how many were quantised."""
    count = 0
    for parent, attr, _names, _bias in model.linear_sources():
        module = getattr(parent, attr)
        if isinstance(module, TorchLinear):
            bias = None if module.bias is None else module.bias.detach()
            setattr(parent, attr, QuantLinear([quantize(module.weight.detach(), method, group_size)], bias))
            count += 1
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            count += module.quantize(lambda w: quantize(w, method, group_size))
    if quantize_lm_head and isinstance(model.lm_head, TorchLinear):
        dtype = model.norm.weight.dtype
        embed = quantize_int8(model.embed_tokens.weight.detach())
        tied = model.lm_head.weight is model.embed_tokens.weight
        model.embed_tokens = QuantEmbedding(embed, dtype)
        if tied:  # one int8 table serves both
            model.lm_head = QuantLinear([embed], tied_embedding=model.embed_tokens)
        else:
            model.lm_head = QuantLinear([quantize_int8(model.lm_head.weight.detach())])
    return count


def describe(model: nn.Module) -> str:
    """One line: how many projections are in which format ("int4 g32 (gguf:Q4_1) x 120, ...")."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            for p in module.parts:
                key = f"int{p.bits} g{p.group_size} ({p.source})"
                counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x {v}" for k, v in sorted(counts.items())) or "none"
