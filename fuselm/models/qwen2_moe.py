"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): the MoE decoder with q/k/v biases, a shared expert with a
sigmoid gate in every sparse layer, top-k weights renormalised only with `norm_topk_prob`, and dense
MLP layers where `mlp_only_layers` / `decoder_sparse_step` say so."""

from __future__ import annotations

import dataclasses

from torch import nn

from fuselm.config import ModelConfig
from fuselm.layers.attention import Attention
from fuselm.models.mixtral import MoEForCausalLM, MoESettings


def num_experts(config: ModelConfig) -> int:
    """Qwen's config.json says num_experts; transformers 5 saves num_local_experts for some families."""
    hf = config.hf_config
    return int(hf.get("num_experts", hf.get("num_local_experts", 0)) or 0)


def qwen_sparse_layer(config: ModelConfig, index: int) -> bool:
    """HF's rule: a layer is sparse unless listed in mlp_only_layers, every decoder_sparse_step-th layer."""
    hf = config.hf_config
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    return index not in (hf.get("mlp_only_layers") or []) and num_experts(config) > 0 and (index + 1) % step == 0


class Qwen2MoeForCausalLM(MoEForCausalLM):
    @staticmethod
    def moe_settings(config: ModelConfig) -> MoESettings:
        hf = config.hf_config
        return MoESettings(num_experts=num_experts(config), top_k=hf["num_experts_per_tok"],
                           intermediate=hf["moe_intermediate_size"], renormalize=bool(hf.get("norm_topk_prob", False)),
                           shared_intermediate=hf.get("shared_expert_intermediate_size") or None)

    @staticmethod
    def make_attention(config: ModelConfig) -> nn.Module:
        biased = dataclasses.replace(config, attention_bias=bool(config.hf_config.get("qkv_bias", True)))
        return Attention(biased, sliding_window=config.sliding_window)

    @staticmethod
    def is_sparse_layer(config: ModelConfig, index: int) -> bool:
        return qwen_sparse_layer(config, index)
