"""HF model directories: config.json, single or sharded *.safetensors, tokenizer files, generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file

from fuselm.config import ModelConfig
from fuselm.loader.types import LoadedModel
from fuselm.tokenizer import Tokenizer

_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) {missing} that are not in {path}; download them")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}; fuselm loads safetensors (or a .gguf file)")
    return files


def _read_shard(file: Path, rank_shard) -> dict[str, torch.Tensor]:
    """Only this tensor-parallel rank's part of each tensor of `file` (safetensors reads slices); a
    tensor the rank holds none of (another rank's expert) is not read at all."""
    with safe_open(str(file), framework="pt") as f:
        parts = {name: rank_shard.read(name, f.get_slice(name)) for name in f.keys()}
    return {name: part for name, part in parts.items() if part is not None}


def load_hf_dir(path: str | Path, dtype: torch.dtype, shard=None) -> LoadedModel:
    """`shard`: a tensor-parallel rank's TensorShard (fuselm/parallel/sharding.py), or None for every weight."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: is {path} an HF model directory?")
    try:
        config = ModelConfig.from_hf_dict(json.loads(cfg_file.read_text()))
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{cfg_file} is not a valid model config ({exc}); re-download the model") from exc
    weights: dict[str, torch.Tensor] = {}
    rank_shard = shard.bind(config) if shard is not None else None
    for file in _safetensors_files(path):
        try:
            found = load_file(str(file)) if rank_shard is None else _read_shard(file, rank_shard)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(
                f"{file} is truncated or corrupt ({exc}); re-download or re-save the weights"
            ) from exc
        for name, tensor in found.items():
            weights[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    defaults = {k: gen[k] for k in _GENERATION_KEYS if k in gen}
    tokenizer = Tokenizer.from_hf_dir(path)
    if not config.eos_token_ids:
        config.eos_token_ids = list(tokenizer.eos_token_ids)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, generation_defaults=defaults,
                       source=str(path))
