"""load_model: pick the loader by what the path is (None = the embedded default model)."""

from __future__ import annotations

from pathlib import Path

import torch

from fuselm.loader.defaults import default_model_path
from fuselm.loader.types import LoadedModel


def load_model(model: str | None, dtype: torch.dtype, tokenizer: str | None = None,
               keep_quantized: bool = False) -> LoadedModel:
    """keep_quantized: a GGUF file's Q4_0/Q4_1/Q4_K/Q8_0/Q6_K tensors come back as QuantWeights."""
    path = Path(model) if model else Path(default_model_path())
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(path)!r} not found; pass an HF model directory or a .gguf file "
            "(no model hub is contacted), or no model for the embedded SmolLM2-135M-Instruct"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a .gguf file or an HF model directory")
        from fuselm.loader.gguf import load_gguf

        loaded = load_gguf(path, dtype, keep_quantized=keep_quantized)
    else:
        from fuselm.loader.hf import load_hf_dir

        loaded = load_hf_dir(path, dtype)
    if tokenizer:
        from fuselm.tokenizer import Tokenizer

        loaded.tokenizer = Tokenizer.from_hf_dir(tokenizer)
    return loaded
