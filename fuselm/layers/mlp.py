"""The gated MLP (SwiGLU): down(silu(gate(x)) * up(x)), gate and up fused into one projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.config import ModelConfig
from fuselm.layers.linear import TorchLinear


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = TorchLinear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = TorchLinear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)
