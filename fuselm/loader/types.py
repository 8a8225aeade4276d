"""LoadedModel: what every loader returns, whatever the file format."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fuselm.config import ModelConfig
from fuselm.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    config: ModelConfig
    # HF parameter names ("model.layers.0.self_attn.q_proj.weight", ...) -> tensors in the chosen dtype,
    # laid out exactly as transformers expects them (GGUF's q/k row permutation already undone).
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    # generation_config.json defaults (temperature, top_p, top_k, repetition_penalty, ...), may be empty
    generation_defaults: dict = field(default_factory=dict)
    source: str = ""
