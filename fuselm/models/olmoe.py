"""OLMoE (allenai/OLMoE-1B-7B): the MoE decoder whose q and k norms are RMSNorms over the whole q and k
projections (not per head, unlike Qwen3), applied before RoPE, with q/k/v optionally clipped to
+-clip_qkv; 64 experts, top-8, weights renormalised only with `norm_topk_prob` (false in the release)."""

from __future__ import annotations

import torch
from torch import nn

from fuselm.config import ModelConfig
from fuselm.layers.attention import Attention
from fuselm.layers.norm import RMSNorm
from fuselm.layers.rotary import RotaryEmbedding
from fuselm.models.mixtral import MoEForCausalLM, MoESettings
from fuselm.layers.paged_attention import paged_attention


class OlmoeAttention(Attention):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.q_norm = RMSNorm(self.q_size, config.rms_norm_eps)  # over all heads of q together
        self.k_norm = RMSNorm(self.kv_size, config.rms_norm_eps)
        self.clip_qkv = config.hf_config.get("clip_qkv")

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, q_size + 2 kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())  # [T, q_size], [T, kv_size]
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        qk = torch.cat((q, k), dim=-1).view(-1, self.num_heads + self.num_kv_heads, self.head_dim)  # [T, Hq+Hkv, D]
        qk = RotaryEmbedding.apply(qk, *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, self.scale, self.k_scale, self.v_scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(-1, self.q_size))


class OlmoeForCausalLM(MoEForCausalLM):
    supports_c_layers = True  # decode_layers.c runs the whole-projection q/k norm and the clamp (QLayer)

    @staticmethod
    def moe_settings(config: ModelConfig) -> MoESettings:
        hf = config.hf_config
        return MoESettings(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                           intermediate=config.intermediate_size, renormalize=bool(hf.get("norm_topk_prob", False)))

    @staticmethod
    def make_attention(config: ModelConfig) -> nn.Module:
        return OlmoeAttention(config)

    def extra_weights(self):
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}.self_attn."
            yield layer.self_attn.q_norm.weight, p + "q_norm.weight"
            yield layer.self_attn.k_norm.weight, p + "k_norm.weight"
