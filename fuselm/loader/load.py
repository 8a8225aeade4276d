"""load_model: pick the loader by what the path is (None = the embedded default model)."""

from __future__ import annotations

from pathlib import Path

import torch

from fuselm.loader.defaults import default_model_path
from fuselm.loader.types import LoadedModel


def load_model(model: str | None, dtype: torch.dtype, tokenizer: str | None = None,
               keep_quantized: bool = False, shard=None) -> LoadedModel:
    """keep_quantized: a GGUF file's Q4_0/Q4_1/Q4_K/Q8_0/Q6_K tensors come back as QuantWeights.

    shard: a tensor-parallel rank's fuselm.parallel.sharding.TensorShard; the weights are then only
    that rank's part of each tensor, cut as it is read (the config stays the whole model's)."""
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

        loaded = load_gguf(path, dtype, keep_quantized=keep_quantized, shard=shard)
    else:
        from fuselm.loader.hf import load_hf_dir

        loaded = load_hf_dir(path, dtype, shard=shard)
    if tokenizer:
        from fuselm.tokenizer import Tokenizer

        loaded.tokenizer = Tokenizer.from_hf_dir(tokenizer)
    return loaded


def keeps_quantized_weights(model: str | None, quantization: str | None) -> bool:
    """Whether the engine will compute with quantised projection weights: `quantization` int8/int4, or None
    (keep what the checkpoint has) on a GGUF file with quantised matrices fuselm computes with directly."""
    if quantization in ("int8", "int4"):
        return True
    if quantization is not None:
        return False
    path = Path(model) if model else Path(default_model_path())
    if path.is_file() and path.suffix == ".gguf":
        from fuselm.loader.gguf import gguf_keeps_quantized_weights

        return gguf_keeps_quantized_weights(path)
    return False
