"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the MoE decoder with RMSNorm on each q and k head before
RoPE, no q/k/v biases, no shared expert, top-k weights renormalised when `norm_topk_prob` (true in
the released models), and dense layers where `mlp_only_layers` / `decoder_sparse_step` say so."""

from __future__ import annotations

from torch import nn

from fuselm.config import ModelConfig
from fuselm.layers.attention import Attention
from fuselm.layers.norm import RMSNorm
from fuselm.models.mixtral import MoEForCausalLM, MoESettings
from fuselm.models.qwen2_moe import num_experts, qwen_sparse_layer


class Qwen3MoeForCausalLM(MoEForCausalLM):
    supports_c_layers = True  # decode_layers.c runs the per-head q/k norm and the MoE block (moe.c)

    @staticmethod
    def moe_settings(config: ModelConfig) -> MoESettings:
        hf = config.hf_config
        return MoESettings(num_experts=num_experts(config), top_k=hf["num_experts_per_tok"],
                           intermediate=hf["moe_intermediate_size"], renormalize=bool(hf.get("norm_topk_prob", False)))

    @staticmethod
    def make_attention(config: ModelConfig) -> nn.Module:
        return Attention(config, qk_norm=RMSNorm, sliding_window=config.sliding_window)

    @staticmethod
    def is_sparse_layer(config: ModelConfig, index: int) -> bool:
        return qwen_sparse_layer(config, index)

    def extra_weights(self):
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}.self_attn."
            yield layer.self_attn.q_norm.weight, p + "q_norm.weight"
            yield layer.self_attn.k_norm.weight, p + "k_norm.weight"
