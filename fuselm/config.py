"""Configuration: the model's shape (ModelConfig) and every engine knob (EngineConfig).

One place for every option so that the CLI, the offline API and the server all accept the
same names (vLLM's where one exists) and validate them the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
}


@dataclass(slots=True)
class ModelConfig:
    """The shape of a decoder-only transformer of the Llama family, from config.json or GGUF."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = archs[0] if archs else ""
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; fuselm supports "
                f"{sorted(SUPPORTED_ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2, SmolLM2)"
            )
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        rope_params = d.get("rope_parameters")  # transformers >= 5 nests RoPE settings here
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        sliding = d.get("sliding_window") if d.get("use_sliding_window", arch == "MistralForCausalLM") else None
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
            sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16).

    Without them torch's bf16 matmuls fall back to slow kernels: on an AVX2-only EPYC we measured
    a [512 x 576] @ [576 x 3072] matmul at 28 ms in float32 and 191 ms in bfloat16 (README).
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def parse_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """'auto': bfloat16 on CUDA and on CPUs with bf16 matrix units, else float32 (measured, see README)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda") or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16")
    return _DTYPES[dtype]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'auto'")
    return device


@dataclass(slots=True)
class EngineConfig:
    """Every engine option. Names follow vLLM's engine arguments where one exists."""

    model: str | None = None  # HF directory or .gguf file; None = the embedded SmolLM2-135M-Instruct
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings (capped at 8192)
    max_num_batched_tokens: int = 512  # the per-step token budget
    max_num_seqs: int = 128
    # Cap the prompt tokens of a step that has running decodes so it takes at most this many times a
    # decode-only step (measured online; fuselm/core/step_cost.py). None: the token budget alone.
    max_decode_slowdown: float | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None  # explicit KV budget; overrides the fractions below
    kv_cache_memory_fraction: float = 0.25  # CPU: share of available RAM for the KV cache
    gpu_memory_utilization: float = 0.9  # CUDA: share of GPU memory the engine may use in all
    seed: int = 0
    num_threads: int | None = None  # CPU intra-op threads; None = torch's default
    kv_cache_dtype: str = "auto"  # auto = the model dtype; bfloat16 halves KV bytes; int8 (+ a scale per token and head)
    # None: a GGUF file keeps its Q4_0/Q4_1/Q4_K/Q8_0/Q6_K tensors quantised (exactly, fuselm/quant/
    # gguf_quants.py) and an HF checkpoint runs at `dtype`; "none": everything dequantised to dtype;
    # "int8" (symmetric) / "int4" (asymmetric), per group: round to nearest at load time
    quantization: str | None = None
    # weights per scale: int4 32 (default), 64 or 128; int8 32 (default, Q8_0's layout) or any multiple of 16,
    # -1 = one scale per output channel (GPTQ's convention). A layer whose width it does not divide
    # takes the largest of 128/64/32 that does.
    quantization_group_size: int | None = None
    quantize_lm_head: bool = True  # with int8/int4: LM head and embeddings in int8 per row (False: keep dtype)
    cpu_kernels: bool = True  # CPU: C kernels + packed weights (False = portable torch path)
    # {"method": "ngram" | "draft_model", "num_speculative_tokens": k, ...} (vLLM's shape), or its JSON
    speculative_config: Any = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_decode_slowdown is not None and not self.max_decode_slowdown > 1.0:
            raise ValueError(f"max_decode_slowdown must be > 1 (e.g. 2: a step with prompt chunks may take twice a "
                             f"decode step), got {self.max_decode_slowdown}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be > 0")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
        if self.kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16", "int8"):
            raise ValueError(f"kv_cache_dtype must be auto, float32, bfloat16, float16 or int8, got {self.kv_cache_dtype!r}")
        if self.quantization not in (None, "none", "int8", "int4"):
            raise ValueError(f"quantization must be int8, int4, none or unset (a GGUF file keeps its own), "
                             f"got {self.quantization!r}")
        group = self.quantization_group_size
        if group is not None:
            if self.quantization == "int4" and group not in (32, 64, 128):
                raise ValueError(f"quantization_group_size for int4 must be 32, 64 or 128, got {group}")
            if self.quantization == "int8" and group != -1 and (group <= 0 or group % 16):
                raise ValueError(f"quantization_group_size for int8 must be a multiple of 16 or -1 (per output "
                                 f"channel), got {group}")
            if self.quantization not in ("int8", "int4"):
                raise ValueError("quantization_group_size needs quantization='int8' or 'int4'")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        from fuselm.spec.config import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known options: {sorted(names)}")
        return cls(model=model, **kwargs)
