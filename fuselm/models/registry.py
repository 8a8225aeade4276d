"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from torch import nn

from fuselm.config import SUPPORTED_ARCHITECTURES, ModelConfig


def build_model(config: ModelConfig, max_positions: int) -> nn.Module:
    family = SUPPORTED_ARCHITECTURES.get(config.architecture)
    if family == "llama":
        from fuselm.models.llama import LlamaForCausalLM

        return LlamaForCausalLM(config, max_positions)
    raise ValueError(f"unsupported architecture {config.architecture!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
