"""Architecture name -> model family: the one table that says what fuselm can run.

A family is a file in fuselm/models/ that composes the shared blocks of fuselm/layers and names its
weights. Adding one is a new file plus an entry here: `ARCHITECTURES` maps the HF `architectures[0]`
name to (module, class, what it covers), and `GGUF_ARCHITECTURES` maps a GGUF
`general.architecture` to the HF name whose class loads it. Nothing here imports a family until it
is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from fuselm.config import ModelConfig

# HF architecture -> (module, class, the models it covers)
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "LlamaForCausalLM": ("fuselm.models.llama", "LlamaForCausalLM", "Llama 2/3, SmolLM2"),
    "MistralForCausalLM": ("fuselm.models.llama", "LlamaForCausalLM", "Mistral"),
    "Qwen2ForCausalLM": ("fuselm.models.llama", "LlamaForCausalLM", "Qwen2/2.5"),
    "MixtralForCausalLM": ("fuselm.models.mixtral", "MixtralForCausalLM", "Mixtral 8x7B/8x22B, MoE"),
    "Qwen2MoeForCausalLM": ("fuselm.models.qwen2_moe", "Qwen2MoeForCausalLM", "Qwen1.5/Qwen2-MoE, shared expert"),
    "Qwen3MoeForCausalLM": ("fuselm.models.qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3-MoE"),
    "OlmoeForCausalLM": ("fuselm.models.olmoe", "OlmoeForCausalLM", "OLMoE"),
    "Qwen3ForCausalLM": ("fuselm.models.qwen3", "Qwen3ForCausalLM", "Qwen3 dense"),
    "Gemma3ForCausalLM": ("fuselm.models.gemma3", "Gemma3ForCausalLM", "Gemma 3 text"),
}

# Architectures whose family applies config.sliding_window to the layers HF does (the others stay
# within the window: the engine caps max_model_len there)
SLIDING_WINDOW_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                          "Qwen3ForCausalLM", "Gemma3ForCausalLM"})

# GGUF general.architecture -> HF architecture
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                      "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                                      "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
                                      "olmoe": "OlmoeForCausalLM"}  # llama with expert tensors: Mixtral


def supported_architectures() -> str:
    """One line naming every architecture and what it covers (for errors and --help)."""
    return ", ".join(f"{arch} ({covers})" for arch, (_, _, covers) in ARCHITECTURES.items())


def models_help() -> str:
    """What `fuselm --help` and the engine commands' help say about models: every architecture and format."""
    gguf = ", ".join(f"{name} ({arch})" for name, arch in GGUF_ARCHITECTURES.items())
    return (f"Supported models: an HF directory (config.json + *.safetensors) of architecture "
            f"{supported_architectures()}; or a GGUF file (llama.cpp) of architecture {gguf}, whose "
            f"Q4_0/Q4_1/Q4_K/Q6_K/Q8_0 weights stay quantised and other types are dequantised at load.")


def check_architecture(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; fuselm supports {supported_architectures()}")


def build_model(config: "ModelConfig", max_positions: int) -> "nn.Module":
    check_architecture(config.architecture)
    module, cls, _ = ARCHITECTURES[config.architecture]
    return getattr(importlib.import_module(module), cls)(config, max_positions)
