"""Mixtral, and the decoder every MoE family here builds on: Llama's attention with an MoE block for the MLP.

`MoEForCausalLM` is LlamaForCausalLM (embedding, RoPE, the forward over the packed batch, the LM
head, weight loading) with layers whose feed-forward is a `fuselm.layers.moe.MoEBlock`, or a dense
gated MLP where the family's config keeps one. A family says how its layers are built and where its
config keeps the expert counts (`moe_settings`, `make_attention`, `is_sparse_layer`); Qwen2-MoE,
Qwen3-MoE and OLMoE (their own files) override only that.

Weights are read under one naming scheme, the one Qwen2-MoE/Qwen3-MoE/OLMoE checkpoints use
(`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`, `mlp.shared_expert.*`); Mixtral's own names
(`block_sparse_moe.gate`, `experts.{e}.w1/w3/w2`) are renamed to it first. The GGUF loader hands
stacked experts as `mlp.experts.{gate,up,down}_proj.weight` ([E, N, K] floats, or a QuantWeight of
E * N rows), which load as they are. Under expert parallelism a rank's config lists the experts it
holds (`ModelConfig.local_experts`): it reads only those, and stacked tensors arrive cut to them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from fuselm.config import ModelConfig
from fuselm.layers.attention import Attention
from fuselm.layers.mlp import MLP
from fuselm.layers.moe import MoEBlock
from fuselm.layers.norm import RMSNorm
from fuselm.models.llama import LlamaForCausalLM
from fuselm.quant.formats import QuantWeight

_MIXTRAL_NAMES = (  # Mixtral's checkpoint names -> the common MoE names
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w1\."), r".mlp.experts.\1.gate_proj."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w3\."), r".mlp.experts.\1.up_proj."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w2\."), r".mlp.experts.\1.down_proj."),
    (re.compile(r"\.block_sparse_moe\.gate\."), r".mlp.gate."),
)


@dataclass(frozen=True)
class MoESettings:
    num_experts: int
    top_k: int
    intermediate: int  # per expert
    renormalize: bool  # renormalise the top-k routing weights to sum to 1
    shared_intermediate: int | None = None  # Qwen2-MoE's shared expert


class MoEDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attention: nn.Module, settings: MoESettings | None,
                 local_experts: list[int] | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if settings is None:
            self.mlp = MLP(config)
        else:
            self.mlp = MoEBlock(config.hidden_size, settings.num_experts, settings.top_k, settings.intermediate,
                                settings.renormalize, settings.shared_intermediate, local_experts)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoEForCausalLM(LlamaForCausalLM):
    """The MoE decoder; subclasses are the families. Mixtral's settings are the defaults."""

    supports_c_layers = True  # decode_layers.c runs Llama's attention with an MoE block (moe.c fuselm_moe_block)

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(config, max_positions, dtype)
        settings = self.moe_settings(config)
        held = config.local_experts or [None] * config.num_hidden_layers  # expert parallelism: this rank's experts
        self.layers = nn.ModuleList(
            MoEDecoderLayer(config, self.make_attention(config), settings if self.is_sparse_layer(config, i) else None,
                            held[i])
            for i in range(config.num_hidden_layers))

    # ---- what a family overrides ----

    @staticmethod
    def moe_settings(config: ModelConfig) -> MoESettings:
        hf = config.hf_config
        return MoESettings(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                           intermediate=config.intermediate_size, renormalize=True)

    @staticmethod
    def make_attention(config: ModelConfig) -> nn.Module:
        return Attention(config, sliding_window=config.sliding_window)

    @staticmethod
    def is_sparse_layer(config: ModelConfig, index: int) -> bool:
        return True

    def rename_weights(self, weights: dict) -> None:
        """Rename a family's own checkpoint names to the common ones, in place."""

    def extra_weights(self):
        """(parameter, HF name) of weights outside projections and layer norms (q/k norms)."""
        return ()

    # ---- shared ----

    def linear_methods(self):
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            yield attn, "qkv_proj", "qkv"
            yield attn, "o_proj", "o"
            if isinstance(mlp, MoEBlock):
                yield mlp, "gate", "router"
                yield mlp, "experts", "experts"
                if mlp.shared_expert is not None:
                    shared = mlp.shared_expert
                    yield shared, "gate_up_proj", "shared_gate_up"
                    yield shared, "down_proj", "shared_down"
                    yield shared, "expert_gate", "shared_gate"
            else:
                yield mlp, "gate_up_proj", "gate_up"
                yield mlp, "down_proj", "down"
        yield self, "lm_head", "lm_head"

    def linear_sources(self):
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            mlp = layer.mlp
            yield from layer.self_attn.linear_sources(p + "self_attn.")
            if isinstance(mlp, MoEBlock):
                yield mlp, "gate", [p + "mlp.gate.weight"], None
                if mlp.shared_expert is not None:
                    s = p + "mlp.shared_expert."
                    yield mlp.shared_expert, "gate_up_proj", [s + "gate_proj.weight", s + "up_proj.weight"], None
                    yield mlp.shared_expert, "down_proj", [s + "down_proj.weight"], None
                    yield mlp.shared_expert, "expert_gate", [p + "mlp.shared_expert_gate.weight"], None
            else:
                yield from mlp.linear_sources(p + "mlp.")

    def load_hf_weights(self, weights: dict) -> None:
        """Experts and extra weights first (taken out of `weights`), then everything Llama loads."""
        self.rename_weights(weights)
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, MoEBlock):
                self._load_experts(layer.mlp, f"model.layers.{i}.mlp.experts.", weights)
        for param, name in self.extra_weights():
            if name not in weights:
                raise ValueError(f"weight {name!r} is missing from the checkpoint; the file is incomplete")
            value = weights.pop(name)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}, the config expects "
                                 f"{tuple(param.shape)}; config.json and the weights disagree")
            with torch.no_grad():
                param.copy_(value)
        super().load_hf_weights(weights)

    def _load_experts(self, block: MoEBlock, prefix: str, weights: dict) -> None:
        experts = block.experts
        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        projections = []
        for proj in ("gate_proj", "up_proj", "down_proj"):
            stacked = weights.pop(prefix + f"{proj}.weight", None)
            if stacked is None:  # one tensor per expert (HF checkpoints); under expert parallelism only those held
                held = block.local_experts if block.local_experts is not None else range(experts.num_experts)
                names = [prefix + f"{e}.{proj}.weight" for e in held]
                missing = [n for n in names if n not in weights]
                if missing:
                    raise ValueError(f"weight {missing[0]!r} is missing from the checkpoint; the file is incomplete")
                stacked = [weights.pop(n) for n in names]
                stacked = [t.dequantize(dtype) if isinstance(t, QuantWeight) else t for t in stacked]
            if isinstance(stacked, QuantWeight):
                stacked = stacked.to(device)
            elif isinstance(stacked, list):
                stacked = [t.to(device, dtype) for t in stacked]
            else:
                stacked = stacked.to(device, dtype)
            projections.append(stacked)
        experts.load(*projections)


class MixtralForCausalLM(MoEForCausalLM):
    """Mixtral 8x7B/8x22B: softmax over the experts, top-k, always renormalised; sliding window if configured."""

    def rename_weights(self, weights: dict) -> None:
        for name in [n for n in weights if "block_sparse_moe" in n]:
            new = name
            for pattern, repl in _MIXTRAL_NAMES:
                new = pattern.sub(repl, new)
            weights[new] = weights.pop(name)
