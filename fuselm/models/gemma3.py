"""Gemma 3, the text model (`Gemma3ForCausalLM`; GGUF arch `gemma3`), over a packed 1-D token batch.

What differs from Llama, all read from the HF config (transformers' Gemma3TextConfig):
- interleaved layers: "sliding_attention" layers attend within `sliding_window` positions and use
  the local rope base (`rope_local_base_freq`, or rope_parameters["sliding_attention"]);
  "full_attention" layers see the whole context with `rope_theta` (+ its rope scaling). The layout
  is `layer_types`, or every `sliding_window_pattern`-th layer global in older configs;
- per-head q/k RMSNorm, softmax scale query_pre_attn_scalar ** -0.5;
- GeGLU MLP (gelu_pytorch_tanh), embeddings scaled by sqrt(hidden_size) (rounded to the model dtype);
- Gemma's RMSNorm (1 + weight, float32) and four norms per layer: input, post-attention (on the
  attention output, before the residual add), pre- and post-feedforward;
- final_logit_softcapping: logits = cap * tanh(logits / cap).
Module names mirror HF's, so every parameter outside the fused projections loads by name.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fuselm.config import ModelConfig
from fuselm.layers.attention import Attention
from fuselm.layers.linear import LinearMethod, TorchLinear
from fuselm.layers.mlp import MLP
from fuselm.layers.norm import GemmaRMSNorm
from fuselm.layers.rotary import RotaryEmbedding
from fuselm.models.llama import dense_linear_methods

SLIDING, FULL = "sliding_attention", "full_attention"

# Gemma's turn format, for files that carry no template (the GGUF of the base model): a system
# message opens the first user turn; the assistant's turns are the "model" role.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if loop.first %}{{ system }}{% endif %}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def layer_types(hf: dict, num_layers: int) -> list[str]:
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]


def rope_settings(hf: dict) -> dict[str, tuple[float, dict | None]]:
    """Layer type -> (rope base, rope scaling or None), from transformers 5's nested rope_parameters
    or the older rope_theta / rope_local_base_freq / rope_scaling keys."""
    nested = hf.get("rope_parameters")
    if isinstance(nested, dict) and FULL in nested:
        out = {}
        for kind, params in nested.items():
            scaling = params if params.get("rope_type", "default") != "default" else None
            out[kind] = (float(params["rope_theta"]), scaling)
        return out
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return {FULL: (float(hf.get("rope_theta", 1_000_000.0)), scaling),
            SLIDING: (float(hf.get("rope_local_base_freq", 10_000.0)), None)}


class Gemma3Rotary(nn.Module):
    """The two cos/sin tables: local (sliding layers) and global (full layers)."""

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        settings = rope_settings(config.hf_config)
        self.by_type = nn.ModuleDict({
            kind: RotaryEmbedding(dataclasses.replace(config, rope_theta=theta, rope_scaling=scaling),
                                  max_positions, dtype)
            for kind, (theta, scaling) in settings.items()
        })

    def tables(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {kind: rope.tables(positions) for kind, rope in self.by_type.items()}


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, kind: str, window: int | None) -> None:
        super().__init__()
        hf, eps = config.hf_config, config.rms_norm_eps
        self.kind = kind
        scale = float(hf.get("query_pre_attn_scalar") or config.head_dim) ** -0.5
        self.self_attn = Attention(config, qk_norm=GemmaRMSNorm, scale=scale, sliding_window=window)
        self.mlp = MLP(config, activation=hf.get("hidden_activation") or "gelu_pytorch_tanh")
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(nn.Module):
    supports_c_layers = False  # decode_layers.c implements Llama's layer only

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        hf = config.hf_config
        if hf.get("attn_logit_softcapping") is not None:
            raise ValueError("attn_logit_softcapping is not supported (Gemma 3 does not set it; Gemma 2 does)")
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention is not supported: fuselm runs causal decoders only")
        self.config = config
        window = hf.get("sliding_window")
        kinds = layer_types(hf, config.num_hidden_layers)
        if len(kinds) != config.num_hidden_layers:
            raise ValueError(f"layer_types names {len(kinds)} layers, the model has {config.num_hidden_layers}")
        # a window the context can never outgrow is no window (the layer may then use the C attention)
        cut = window if window and window < max_positions else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, kind, cut if kind == SLIDING else None) for kind in kinds)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = Gemma3Rotary(config, max_positions, dtype)
        self.lm_head = None if config.tie_word_embeddings else TorchLinear(config.hidden_size, config.vocab_size)
        self.softcap = hf.get("final_logit_softcapping")
        self.c_layers = None  # never set: supports_c_layers is False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)  # HF rounds the scale to the dtype
        ropes = self.rope.tables(positions)  # kind -> ([T, 1, D], [T, 1, D])
        for layer in self.layers:
            x = layer(x, ropes[layer.kind])
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] logits, soft-capped when the config says so."""
        logits = self.lm_head(hidden)  # [S, vocab]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def linear_methods(self):
        """(parent module, attribute, role) of every LinearMethod slot (see models/llama.py)."""
        return dense_linear_methods(self)

    def linear_sources(self):
        """(parent module, attribute, HF weight names fused in output order, HF bias names or None)."""
        for i, layer in enumerate(self.layers):
            yield from layer.self_attn.linear_sources(f"model.layers.{i}.self_attn.")
            yield from layer.mlp.linear_sources(f"model.layers.{i}.mlp.")

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors in (consuming `weights`): the fused projections from linear_sources,
        every other parameter by its own name under "model.". Raises ValueError on a missing,
        misshapen or unexpected tensor. Projections installed quantised took their tensors before."""

        def put(param: torch.Tensor, name: str, parts: list[str]) -> None:
            missing = [n for n in parts if n not in weights]
            if missing:
                raise ValueError(f"weight {missing[0]!r} is missing from the checkpoint; not a Gemma 3 model?")
            value = torch.cat([weights.pop(n) for n in parts])
            if value.shape != param.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}, the config expects "
                                 f"{tuple(param.shape)}; config.json and the weights disagree")
            with torch.no_grad():
                param.copy_(value)

        for parent, attr, names, bias_names in self.linear_sources():
            module = getattr(parent, attr)
            if isinstance(module, TorchLinear):
                put(module.weight, names[0], names)
                if bias_names:
                    put(module.bias, bias_names[0], bias_names)
        for prefix, module in self.named_modules():
            if isinstance(module, LinearMethod):
                continue
            for pname, param in module.named_parameters(recurse=False):
                name = f"model.{prefix}.{pname}"
                put(param, name, [name])
        if isinstance(self.lm_head, TorchLinear):
            put(self.lm_head.weight, "lm_head.weight", ["lm_head.weight"])
        else:  # tied, or already installed quantised
            weights.pop("lm_head.weight", None)
        if weights:
            raise ValueError(f"unexpected weights in the checkpoint: {sorted(weights)[:5]}...; not a Gemma 3 model?")
        if self.lm_head is None:  # tied: the LM head multiplies by the embedding table
            self.lm_head = TorchLinear.sharing(self.embed_tokens.weight)
