"""The gated MLP: down(act(gate(x)) * up(x)), gate and up fused into one projection; act is SiLU
(SwiGLU, the default) or tanh-approximated GELU (GeGLU: Gemma's gelu_pytorch_tanh)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.config import ModelConfig
from fuselm.layers.linear import TorchLinear


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP activation {activation!r} is not supported ({', '.join(ACTIVATIONS)} are)")
        self.act = ACTIVATIONS[activation]
        self.intermediate = config.intermediate_size
        self.gate_up_proj = TorchLinear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = TorchLinear(config.intermediate_size, config.hidden_size, bias=False)

    def linear_sources(self, prefix: str):
        """(self, attribute, HF weight names, None) of the fused gate/up and the down projection under
        `prefix` (e.g. "model.layers.3.mlp.")."""
        yield self, "gate_up_proj", [prefix + "gate_proj.weight", prefix + "up_proj.weight"], None
        yield self, "down_proj", [prefix + "down_proj.weight"], None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)  # [T, I] each
        return self.down_proj(self.act(gate) * up)
