"""Write a GGUF model out as an HF transformers directory, so HF can run the very same weights.

Benchmarks and accuracy checks compare fuselm with `transformers`, and that comparison is only fair
when both run identical numbers. The embedded model ships only as a quantised GGUF, which
transformers cannot read without its own (different) dequantisation path, so we dequantise with
fuselm's loader (`load_gguf`, which already yields HF parameter names and HF's q/k row order) and
save config.json, model.safetensors, tokenizer files and generation_config.json. The export is
cached: a marker file records the source file and dtype, and a matching marker skips the work.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from fuselm.loader.defaults import default_model_path
from fuselm.loader.gguf import load_gguf
from fuselm.loader.types import LoadedModel

MARKER = ".fuselm_export.json"
_FORMAT_VERSION = 1  # bump when the files written change, so old exports are redone
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3_text"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported for export; use one of {sorted(_DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported for export; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _marker_for(source: Path, dtype: torch.dtype) -> dict:
    st = source.stat()
    return {"format_version": _FORMAT_VERSION, "source": str(source.resolve()), "source_size": st.st_size,
            "source_mtime_ns": st.st_mtime_ns, "dtype": _dtype_name(dtype)}


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _config_json(model: LoadedModel, dtype: torch.dtype) -> dict:
    c = model.config
    if c.architecture not in _MODEL_TYPES:
        raise ValueError(f"cannot export architecture {c.architecture!r}; known: {sorted(_MODEL_TYPES)}")
    eos = c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else (list(c.eos_token_ids) or None)
    pad = model.tokenizer.pad_token_id
    cfg = {
        "architectures": [c.architecture],
        "model_type": _MODEL_TYPES[c.architecture],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        # The pre-v5 spelling: transformers 4.x reads it, and 5.x converts it into rope_parameters.
        "rope_theta": c.rope_theta,
        "rope_scaling": dict(c.rope_scaling) if c.rope_scaling else None,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": _dtype_name(dtype),
    }
    if cfg["model_type"] == "gemma3_text":  # the family's own settings, as the GGUF loader named them
        cfg.pop("hidden_act")
        cfg.update({k: v for k, v in c.hf_config.items() if k not in ("rope_theta", "rope_scaling")},
                   attention_bias=False, attn_logit_softcapping=None)
    elif cfg["model_type"] == "qwen2":  # Qwen2 always has q/k/v biases; only its windowing is configurable
        cfg.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                   max_window_layers=c.num_hidden_layers)
    else:
        cfg.update(attention_bias=c.attention_bias, mlp_bias=False, pretraining_tp=1)
        if cfg["model_type"] == "mistral":
            cfg["sliding_window"] = c.sliding_window
    return cfg


def _write_tokenizer(model: LoadedModel, out: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    tok = model.tokenizer
    hf = HFTokenizer.from_str(tok.hf.to_str())  # a copy: the loaded tokenizer stays as it was

    def text(token_id: int | None) -> str | None:
        return hf.id_to_token(token_id) if token_id is not None else None

    bos = text(tok.bos_token_id)
    # fuselm prepends BOS itself when a GGUF says add_bos_token; an HF tokenizer.json does it in its
    # post-processor, which is where both transformers and fuselm's HF loader expect it.
    if tok.add_bos_token and bos is not None:
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_token_id)])
    hf.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": text(tok.eos_token_id),
        "pad_token": text(tok.pad_token_id),
        "add_bos_token": bool(tok.add_bos_token and bos is not None),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.config.max_position_embeddings,
    }
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2))


def _generation_config(model: LoadedModel) -> dict:
    c = model.config
    eos = c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids)
    gen = {"bos_token_id": c.bos_token_id, "eos_token_id": eos or None, "pad_token_id": model.tokenizer.pad_token_id}
    gen.update(model.generation_defaults or {})
    return {k: v for k, v in gen.items() if v is not None}


def _write_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses non-contiguous tensors (the un-permuted q/k rows can be views).
    tensors = {name: t.detach().contiguous() for name, t in sorted(weights.items())}
    save_file(tensors, str(path), metadata={"format": "pt"})


def export_hf_dir(out_dir: str | os.PathLike, dtype: str | torch.dtype = "float32",
                  gguf_path: str | os.PathLike | None = None) -> Path:
    """Export `gguf_path` (default: the embedded SmolLM2-135M-Instruct) dequantised to `dtype` as an
    HF model directory at `out_dir`; return its path. `AutoModelForCausalLM.from_pretrained(path)`
    then loads exactly the weights fuselm runs from the GGUF in that dtype.

    Does nothing when `out_dir` already holds an export of the same file and dtype. Refuses to
    write into a non-empty directory that is not a fuselm export, so it never clobbers a real model.
    """
    torch_dtype = _as_dtype(dtype)
    source = Path(gguf_path) if gguf_path is not None else Path(default_model_path())
    out = Path(out_dir)
    wanted = _marker_for(source, torch_dtype)
    found = _read_marker(out)
    if found == wanted and all((out / f).is_file() for f in _FILES):
        return out
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and found is None:
        raise ValueError(f"{out} is a non-empty directory that fuselm did not export; choose another out_dir")

    model = load_gguf(source, torch_dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # an interrupted export must never look complete
    # Write the weights under a temporary name and rename, so a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".model-", suffix=".safetensors.tmp")
    os.close(fd)
    try:
        _write_weights(model.weights, Path(tmp))
        os.replace(tmp, out / "model.safetensors")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    (out / "config.json").write_text(json.dumps(_config_json(model, torch_dtype), indent=2))
    (out / "generation_config.json").write_text(json.dumps(_generation_config(model), indent=2))
    _write_tokenizer(model, out)
    (out / MARKER).write_text(json.dumps(wanted, indent=2))
    return out


def default_export_dir(dtype: str | torch.dtype, gguf_path: str | os.PathLike | None = None) -> Path:
    """A per-user cache location for the export of `gguf_path` (default: the embedded model) in `dtype`."""
    source = Path(gguf_path) if gguf_path is not None else Path(default_model_path())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fuselm" / "hf_export"
    return root / f"{source.stem}-{_dtype_name(_as_dtype(dtype))}"
