"""Self-attention over the paged KV cache: a fused q/k/v projection, rotary embeddings on q and k,
attention through the runner's paged attention (fuselm/layers/paged_attention.py), the o projection.
The KV cache tensors are attached by the model runner.

Options a family sets (Llama sets none of them):
- `qk_norm`: a norm class applied per head to q and to k before the rotary embedding, each with
  its own weight over head_dim (Qwen3, Qwen3-MoE, Gemma 3);
- `scale`: the softmax scale when it is not head_dim ** -0.5 (Gemma 3's query_pre_attn_scalar);
- `sliding_window`: the layer attends only to the last `sliding_window` positions, itself included
  (Mistral, Gemma 3's local layers).
"""

from __future__ import annotations

import torch
from torch import nn

from fuselm.config import ModelConfig
from fuselm.layers.linear import TorchLinear
from fuselm.layers.rotary import RotaryEmbedding
from fuselm.layers.paged_attention import paged_attention


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, qk_norm: type[nn.Module] | None = None, scale: float | None = None,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.qkv_proj = TorchLinear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = TorchLinear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = qk_norm(self.head_dim, config.rms_norm_eps) if qk_norm is not None else None
        self.k_norm = qk_norm(self.head_dim, config.rms_norm_eps) if qk_norm is not None else None
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, kv_heads, head_dim], set by the runner
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None  # int8 cache only: [num_blocks, block_size, kv_heads] scales
        self.v_scale: torch.Tensor | None = None
        self.kv_group = 0  # the KV cache group whose block tables this layer reads (set by the runner)

    def linear_sources(self, prefix: str):
        """(self, attribute, HF weight names fused in output order, HF bias names or None) of the q/k/v
        and o projections under `prefix` (e.g. "model.layers.3.self_attn.")."""
        biases = [prefix + f"{n}_proj.bias" for n in "qkv"] if self.qkv_proj.bias is not None else None
        yield self, "qkv_proj", [prefix + f"{n}_proj.weight" for n in "qkv"], biases
        yield self, "o_proj", [prefix + "o_proj.weight"], None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, q_size + 2 kv_size]
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.reshape(-1, self.num_heads + self.num_kv_heads, self.head_dim)  # [T, Hq+Hkv, D]
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)  # [T, Hq+Hkv, D]
        # q and k heads are adjacent in the fused projection: rotate them in one go.
        qk = RotaryEmbedding.apply(qk, *rope)  # [T, Hq+Hkv, D]
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, self.scale, self.k_scale, self.v_scale,
                            window=self.sliding_window, kv_group=self.kv_group)  # [T, Hq, D]
        return self.o_proj(o.reshape(-1, self.q_size))
