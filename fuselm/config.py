"""Configuration: the model's shape (ModelConfig) and every engine knob (EngineConfig).

One place for every option so that the CLI, the offline API and the server all accept the
same names (vLLM's where one exists) and validate them the same way.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from fuselm.errors import InvalidConfigError


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
    # The whole config.json (or, for GGUF, the HF-named equivalent the loader builds): fields that only
    # one family reads (experts, q/k norms, sliding-window layouts) are read by that family's file.
    hf_config: dict[str, Any] = field(default_factory=dict)
    # Expert parallelism: the global ids of the experts this rank holds, per layer (None for a dense
    # layer); None: every expert (fuselm/parallel/expert_parallel.py)
    local_experts: list[list[int] | None] | None = None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = archs[0] if archs else ""
        from fuselm.models.registry import check_architecture

        check_architecture(arch)
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
            hf_config=dict(d),
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


def parse_dtype(dtype: str | torch.dtype, device: str, quantized_weights: bool = False) -> torch.dtype:
    """'auto': bfloat16 on CUDA; on CPU float32 where the projections' weights stay quantised (`quantized_weights`:
    fuselm's quantised matmuls and its one-call C layer step take float32 activations, and bfloat16 ones sent the
    layers to torch: batch-1 decode of the embedded Q4 GGUF 65-78 tok/s against 176-198 on a Zen 4 EPYC with
    AVX512-BF16), else bfloat16 on CPUs with bf16 matrix units and float32 elsewhere (measured, see README)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16
        if not quantized_weights and cpu_has_fast_bf16():
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


def _option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """An EngineConfig field with its documentation: the one text the CLI help is generated from."""
    return field(default=default, metadata={"help": help, "choices": choices})


KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
QUANTIZATION_METHODS = ("none", "int8", "int4")
DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray")


@dataclass(slots=True)
class EngineConfig:
    """Every engine option. Names follow vLLM's engine arguments where one exists.

    Each field's `help` metadata is its documentation; `fuselm generate/chat/serve/bench throughput`
    build their engine flags from these fields (fuselm/cli.py add_engine_args).
    """

    model: str | None = _option(None, "HF model directory or .gguf file; unset: the embedded SmolLM2-135M-Instruct")
    tokenizer: str | None = _option(None, "tokenizer directory; unset: the model's own tokenizer")
    dtype: str = _option("auto", "weight and activation dtype: auto, float32, bfloat16 or float16; auto is bfloat16 "
                                 "on CUDA and on CPUs with AMX or AVX512-BF16, else float32 (also on CPU for "
                                 "weights kept quantised: a GGUF's, or quantization int8/int4)")
    device: str = _option("auto", "auto, cpu or cuda (cuda:N); auto is cuda when torch sees a GPU, else cpu")
    max_model_len: int | None = _option(None, "longest prompt + output in tokens; unset: the model's "
                                              "max_position_embeddings (its sliding window if smaller), at most "
                                              "8192; lowered to what the KV cache holds")
    max_num_batched_tokens: int = _option(512, "token budget of one step: decodes, prompt chunks and speculative "
                                               "tokens together")
    max_num_seqs: int = _option(128, "most requests running at once")
    max_num_seqs_per_client: int | None = _option(
        None, "most sequences one client may have running while another client has requests waiting or "
              "running, or had within the last second (its others wait; admission is fair between clients "
              "either way); unset: no cap. "
              "Clients are told apart by API key, X-Client-Id header, the request's user field or the peer "
              "address (docs/server.md)")
    max_decode_slowdown: float | None = _option(
        None, "cap the prompt tokens of a step that has running decodes so that it takes at most this many times "
              "a decode-only step (costs measured online, fuselm/core/step_cost.py); unset: the token budget alone")
    block_size: int = _option(16, "tokens per KV cache block, a power of two")
    enable_prefix_caching: bool = _option(True, "reuse the KV blocks of equal prompt prefixes across requests")
    enable_cascade_attention: bool = _option(
        True, "decode and speculative rows whose KV block tables start with the same blocks (a shared prompt "
              "prefix, the n samples of one prompt) read those blocks once per step for all of them, merged "
              "exactly with each row's own part (shared-prefix attention)")
    prefix_aware_admission: bool = _option(
        False, "among waiting requests of equal priority, admit first those whose prompt starts with blocks "
               "running requests have computed, so sharing sequences run together (larger shared-prefix "
               "groups); a request passed over 8 times goes first (core/prefix_admission.py)")
    kv_cache_memory_bytes: int | None = _option(None, "KV cache size in bytes; overrides kv_cache_memory_fraction "
                                                      "and gpu_memory_utilization")
    kv_cache_memory_fraction: float = _option(0.25, "CPU: share of the available RAM the KV cache takes")
    gpu_memory_utilization: float = _option(0.9, "CUDA: share of the GPU memory the engine may use in all (weights, "
                                                 "activations and KV cache)")
    seed: int = _option(0, "seed of torch's global generator, which requests without a seed of their own sample from")
    num_threads: int | None = _option(None, "CPU threads for torch and the C kernels; unset: torch's default")
    kv_cache_dtype: str = _option("auto", "auto (the model dtype), float32, bfloat16, float16 or int8 (symmetric, "
                                          "one bfloat16 scale per token and KV head; about half of bfloat16's "
                                          "bytes)", KV_CACHE_DTYPES)
    quantization: str | None = _option(
        None, "unset: a GGUF file keeps its Q4_0/Q4_1/Q4_K/Q8_0/Q6_K weights quantised (exactly) and an HF "
              "checkpoint runs at dtype; none: everything dequantised to dtype; int8 (symmetric, weight = q * scale) "
              "or int4 (asymmetric, weight = q * scale + min): weight-only, one scale per group of "
              "quantization_group_size input weights, rounded to nearest at load time", QUANTIZATION_METHODS)
    quantization_group_size: int | None = _option(
        None, "input weights per scale: int4 32 (default), 64 or 128; int8 32 (default, the layout of GGUF Q8_0) "
              "or any multiple of 16, -1 = one scale per output channel. A layer whose width the size does not "
              "divide takes the largest smaller one of 128/64/32 (int8 also 16) that does")
    quantize_lm_head: bool = _option(True, "with int8/int4: the LM head and the embeddings in int8, one scale per "
                                           "vocabulary row (off: kept at dtype)")
    cpu_kernels: bool = _option(True, "CPU: fuselm's C kernels (attention, RMSNorm, packed GEMMs, quantised "
                                      "matmuls, the one-call layer stack) and oneDNN-packed bf16 weights; off: the "
                                      "portable torch path")
    tensor_parallel_size: int = _option(
        1, "split the model over this many processes (Megatron-style: attention heads, the MLP and the vocabulary "
           "sliced, one all-reduce after o and after down); each holds its shard of the weights and of the KV "
           "cache, reads only that shard from the file, and on CPU pins its own cores (num_threads each); "
           "docs/parallel.md")
    distributed_executor_backend: str = _option(
        "mp", "how the other tensor-parallel ranks start: mp (local worker processes) or ray (Ray actors in a "
              "placement group, so the ranks may span the machines of a Ray cluster; needs `pip install ray` and a "
              "running cluster, or starts a local one)", DISTRIBUTED_EXECUTOR_BACKENDS)
    enable_expert_parallel: bool = _option(
        False, "with tensor_parallel_size > 1 and a mixture-of-experts model: each rank holds whole experts (an "
               "equal share, round-robin or per expert_placement) instead of a slice of every expert; attention "
               "stays tensor-parallel; each rank runs its experts for the tokens routed to them and one all-reduce "
               "per layer sums the results; docs/expert_parallel.md")
    expert_placement: str | None = _option(
        None, "with enable_expert_parallel: a JSON file saying which rank holds each expert of each MoE layer, as "
              "`fuselm placement` writes it from recorded routing statistics; unset: expert e on rank e mod N")
    kv_compression: Any = _option(
        None, 'KV cache compression for every request that does not set its own, a dict or its JSON: {"method": '
              '"snapkv", "budget": 1024, "window": 32} (keep the prompt positions its last queries attend to) or '
              '{"method": "streaming", "sink": 4, "window": 1024} (attention sinks + recent window) or '
              '{"method": "h2o", "budget": 512, "recent": 512} (accumulated-attention heavy hitters + recent); '
              'fuselm/kv_compression.py, docs/kv_compression.md')
    speculative_config: Any = _option(
        None, 'speculative decoding, a dict or its JSON: {"method": "ngram", "num_speculative_tokens": 4} '
              '(prompt lookup) or {"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}; other '
              "keys: prompt_lookup_min, prompt_lookup_max, adaptive (fuselm/spec/config.py)")

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise InvalidConfigError(f"block_size must be a positive power of two, got {self.block_size}",
                                     option="block_size")
        if self.max_num_batched_tokens < 1:
            raise InvalidConfigError("max_num_batched_tokens must be >= 1", option="max_num_batched_tokens")
        if self.max_num_seqs < 1:
            raise InvalidConfigError("max_num_seqs must be >= 1", option="max_num_seqs")
        if self.max_num_seqs_per_client is not None and self.max_num_seqs_per_client < 1:
            raise InvalidConfigError(f"max_num_seqs_per_client must be >= 1 (or unset for no cap), got "
                                     f"{self.max_num_seqs_per_client}", option="max_num_seqs_per_client")
        if self.max_decode_slowdown is not None and not self.max_decode_slowdown > 1.0:
            raise InvalidConfigError(f"max_decode_slowdown must be > 1 (e.g. 2: a step with prompt chunks may take "
                                     f"twice a decode step), got {self.max_decode_slowdown}",
                                     option="max_decode_slowdown")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InvalidConfigError("max_model_len must be >= 1", option="max_model_len")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise InvalidConfigError("kv_cache_memory_bytes must be > 0", option="kv_cache_memory_bytes")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise InvalidConfigError("kv_cache_memory_fraction must be in (0, 1]", option="kv_cache_memory_fraction")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidConfigError(f"kv_cache_dtype must be auto, float32, bfloat16, float16 or int8, "
                                     f"got {self.kv_cache_dtype!r}", option="kv_cache_dtype")
        if self.quantization not in (None, *QUANTIZATION_METHODS):
            raise InvalidConfigError(f"quantization must be int8, int4, none or unset (a GGUF file keeps its own), "
                                     f"got {self.quantization!r}", option="quantization")
        group = self.quantization_group_size
        if group is not None:
            if self.quantization == "int4" and group not in (32, 64, 128):
                raise InvalidConfigError(f"quantization_group_size for int4 must be 32, 64 or 128, got {group}",
                                         option="quantization_group_size")
            if self.quantization == "int8" and group != -1 and (group <= 0 or group % 16):
                raise InvalidConfigError(f"quantization_group_size for int8 must be a multiple of 16 or -1 (per output "
                                         f"channel), got {group}", option="quantization_group_size")
            if self.quantization not in ("int8", "int4"):
                raise InvalidConfigError("quantization_group_size needs quantization='int8' or 'int4'",
                                         option="quantization_group_size")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidConfigError("gpu_memory_utilization must be in (0, 1]", option="gpu_memory_utilization")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            raise InvalidConfigError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}",
                                     option="tensor_parallel_size")
        if self.distributed_executor_backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise InvalidConfigError(f"distributed_executor_backend must be mp or ray, got "
                                     f"{self.distributed_executor_backend!r}", option="distributed_executor_backend")
        if not isinstance(self.enable_expert_parallel, bool):
            raise InvalidConfigError(f"enable_expert_parallel must be true or false, got "
                                     f"{self.enable_expert_parallel!r}", option="enable_expert_parallel")
        if self.enable_expert_parallel and self.tensor_parallel_size < 2:
            raise InvalidConfigError("enable_expert_parallel needs tensor_parallel_size > 1 (the experts are spread "
                                     "over the tensor-parallel ranks)", option="enable_expert_parallel")
        if self.expert_placement is not None and not self.enable_expert_parallel:
            raise InvalidConfigError("expert_placement needs enable_expert_parallel", option="expert_placement")
        if self.tensor_parallel_size > 1 and self.speculative_config is not None:
            raise InvalidConfigError("speculative_config is not supported with tensor_parallel_size > 1 (the draft "
                                     "and the verification run in one process); leave one of them unset",
                                     option="speculative_config")
        if isinstance(self.kv_compression, str):
            try:
                self.kv_compression = json.loads(self.kv_compression)
            except ValueError as exc:
                raise InvalidConfigError(f"kv_compression is not valid JSON: {exc}", option="kv_compression") from None
        from fuselm.kv_compression import KVCompression

        try:
            self.kv_compression = KVCompression.parse(self.kv_compression)
        except ValueError as exc:
            raise InvalidConfigError(str(exc), option="kv_compression") from None
        from fuselm.spec.config import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InvalidConfigError(f"unknown engine option(s) {unknown}; known options: {sorted(names)}",
                                     option=unknown[0])
        return cls(model=model, **kwargs)
