"""Qwen3 (dense): the Llama layer with a per-head RMSNorm on q and on k before the rotary
embedding, and no q/k/v biases.

Everything but the attention is Llama's (models/llama.py): the same fused projections, MLP, norms
and weight names, plus `self_attn.q_norm.weight` and `self_attn.k_norm.weight` per layer. A config
with sliding-window layers (`layer_types` naming "sliding_attention", set by use_sliding_window and
max_window_layers) gives those layers their window. Without windowed layers the C layer step runs it
(decode_layers.c has the per-head q/k norm); with them, the torch layers.
"""

from __future__ import annotations

import torch

from fuselm.config import ModelConfig
from fuselm.layers.attention import Attention
from fuselm.layers.norm import RMSNorm
from fuselm.models.llama import LlamaForCausalLM


def layer_windows(config: ModelConfig, max_positions: int) -> list[int | None]:
    """The sliding window of each layer (None: full attention). A window the context can never
    outgrow (>= max_positions) is no window."""
    hf = config.hf_config
    window = hf.get("sliding_window")
    types = hf.get("layer_types") or ["full_attention"] * config.num_hidden_layers
    if not hf.get("use_sliding_window", False) or not window or window >= max_positions:
        return [None] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


class Qwen3ForCausalLM(LlamaForCausalLM):
    supports_c_layers = True  # decode_layers.c runs the per-head q/k RMSNorm (QLayer.q_norm, k_norm)

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(config, max_positions, dtype)
        for layer, window in zip(self.layers, layer_windows(config, max_positions)):
            layer.self_attn = Attention(config, qk_norm=RMSNorm, sliding_window=window)

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Llama's loading plus each layer's q/k norm weights (taken out first, so Llama's check for
        leftover tensors sees none of them)."""
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            for norm, name in ((attn.q_norm, "q_norm"), (attn.k_norm, "k_norm")):
                key = f"model.layers.{i}.self_attn.{name}.weight"
                if key not in weights:
                    raise ValueError(f"weight {key!r} is missing from the checkpoint; not a Qwen3 model?")
                value = weights.pop(key)
                if value.shape != norm.weight.shape:
                    raise ValueError(f"weight {key!r} has shape {tuple(value.shape)}, the config expects "
                                     f"{tuple(norm.weight.shape)}")
                with torch.no_grad():
                    norm.weight.copy_(value)
        super().load_hf_weights(weights)
