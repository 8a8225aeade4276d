"""GGUF files (llama.cpp's format) -> LoadedModel with HF transformers parameter names.

We parse the GGUF header ourselves instead of using `gguf.GGUFReader`: the reader builds numpy
views for every one of the ~100k vocabulary strings and takes ~2.5 s on SmolLM2; reading the
header with `struct` from a memory map takes ~0.2 s. Tensor data stays in the memory map until it
is dequantised (`gguf.quants.dequantize`), cast to the requested dtype and, for arch `llama`, has
llama.cpp's q/k row permutation undone so that it matches HF's rotate-half RoPE. With
keep_quantized, tensors of a type that maps exactly onto a fuselm format (fuselm/quant/
gguf_quants.py) skip the dequantisation and come back as QuantWeights.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuselm.config import ModelConfig
from fuselm.loader.gguf_tokenizer import build_gguf_tokenizer
from fuselm.loader.types import LoadedModel
from fuselm.models.registry import GGUF_ARCHITECTURES as _ARCHITECTURES
from fuselm.models.registry import supported_architectures
from fuselm.tokenizer import Tokenizer

_MAGIC = b"GGUF"
# GGUF value types: struct format of each scalar type, numpy dtype of arrays of them.
_STRING, _ARRAY = 8, 9
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
# Plain float tensors are read as they are; every other ggml type goes through gguf.quants.dequantize.
_FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGMLQuantizationType F32, F16, BF16
_FIX = "re-download the file or re-convert the model with llama.cpp's convert_hf_to_gguf.py"


class _Corrupt(Exception):
    """Raised inside the parser; load_gguf turns it into a ValueError naming the file."""


@dataclass(frozen=True, slots=True)
class _TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order (ggml's ne reversed): [rows, cols] for a matrix
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Header:
    """Sequential little-endian reader over the memory-mapped header."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > self.size:
            raise _Corrupt(f"a string of {n} bytes runs past the end of the file")
        text = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return text

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype != _ARRAY:
            raise _Corrupt(f"unknown metadata value type {vtype}")
        itype, count = self.scalar("<I"), self.scalar("<Q")
        if itype in _NP:  # numbers: one bulk read
            dt = np.dtype(_NP[itype])
            if self.pos + count * dt.itemsize > self.size:
                raise _Corrupt(f"an array of {count} numbers runs past the end of the file")
            arr = np.frombuffer(self.buf, dt, count, self.pos).copy()
            self.pos += count * dt.itemsize
            return arr
        if itype == _STRING:  # the vocabulary and merges: the hot loop of header parsing
            buf, pos, out, unpack = self.buf, self.pos, [], struct.Struct("<Q").unpack_from
            for _ in range(count):
                (n,) = unpack(buf, pos)
                out.append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
            if pos > self.size:
                raise _Corrupt("a string array runs past the end of the file")
            self.pos = pos
            return out
        return [self.value(itype) for _ in range(count)]


def _parse(buf: mmap.mmap) -> tuple[dict[str, Any], dict[str, _TensorInfo]]:
    if buf[:4] != _MAGIC:
        raise _Corrupt(f"it does not start with the GGUF magic bytes (found {bytes(buf[:4])!r})")
    h = _Header(buf)
    h.pos = 4
    try:
        return _parse_after_magic(h)
    except (struct.error, UnicodeDecodeError, ValueError, OverflowError, IndexError, MemoryError):
        raise _Corrupt(f"its header is truncated or corrupt (it does not parse within the {h.size}-byte file)") from None


def _parse_after_magic(h: _Header) -> tuple[dict[str, Any], dict[str, _TensorInfo]]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    buf = h.buf
    version = h.scalar("<I")
    if version & 0xFFFF == 0:
        raise _Corrupt("it is a big-endian GGUF; fuselm reads little-endian files only")
    if version not in (2, 3):
        raise _Corrupt(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = h.scalar("<Q"), h.scalar("<Q")
    if n_tensors > h.size or n_kv > h.size:
        raise _Corrupt(f"its header is truncated or corrupt ({n_tensors} tensors and {n_kv} metadata keys "
                       f"cannot fit in {h.size} bytes)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = h.string()
        meta[key] = h.value(h.scalar("<I"))
    raw = []
    for _ in range(n_tensors):
        name = h.string()
        n_dims = h.scalar("<I")
        if not 1 <= n_dims <= 4:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
        ne = struct.unpack_from(f"<{n_dims}Q", buf, h.pos)  # ggml order: ne[0] is the contiguous axis
        h.pos += 8 * n_dims
        raw.append((name, ne, h.scalar("<I"), h.scalar("<Q")))
    align = int(meta.get("general.alignment", 32))
    if align <= 0 or align & (align - 1):
        raise _Corrupt(f"general.alignment {align} is not a power of two")
    data_start = -(-h.pos // align) * align
    tensors: dict[str, _TensorInfo] = {}
    for name, ne, gtype, rel in raw:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name!r} has unknown ggml type {gtype} (a newer gguf package may know it)")
        n_el = int(np.prod(ne, dtype=np.uint64)) if ne else 1
        if ne[0] % block:
            raise _Corrupt(f"tensor {name!r} rows ({ne[0]}) are not a multiple of the block size {block}")
        info = _TensorInfo(name, gtype, tuple(reversed(ne)), data_start + rel, n_el // block * type_size)
        if info.offset + info.nbytes > h.size:
            raise _Corrupt(
                f"it is truncated: tensor {name!r} ends at byte {info.offset + info.nbytes} "
                f"but the file has only {h.size} bytes"
            )
        tensors[name] = info
    return meta, tensors


def _read_tensor(buf: mmap.mmap, info: _TensorInfo, dtype: torch.dtype, keep_quantized: bool = False):
    """One tensor, dequantised, in `dtype`, shaped as torch/HF lays it out; never aliases the map.
    With keep_quantized, a 2-D tensor of a type fuselm computes with directly is a QuantWeight instead."""
    if info.ggml_type in _FLOAT_TYPES:
        src = _FLOAT_TYPES[info.ggml_type]
        count = info.nbytes // src.itemsize
        t = torch.frombuffer(buf, dtype=src, count=count, offset=info.offset)  # [N], aliases the map
        return t.reshape(info.shape).to(dtype, copy=True)
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.ggml_type)
    block, type_size = GGML_QUANT_SIZES[qtype]
    row_bytes = info.shape[-1] // block * type_size
    data = np.frombuffer(buf, np.uint8, info.nbytes, info.offset).reshape(-1, row_bytes)  # [rows, bytes]
    if keep_quantized and len(info.shape) in (2, 3):  # 3-D: stacked experts [E, N, K], kept as E * N rows
        from fuselm.quant.gguf_quants import to_quant_weight

        kept = to_quant_weight(data, info.ggml_type, (int(np.prod(info.shape[:-1])), info.shape[-1]))
        if kept is not None:
            return kept
    try:
        values = dequantize(data, qtype)  # [rows, cols] float32
    except NotImplementedError:
        raise _Corrupt(f"tensor {info.name!r} uses {qtype.name}, which gguf.quants cannot dequantise; "
                       "use a file quantised as Q4_0/Q4_1/Q5_x/Q8_0/Qx_K/F16/F32")
    return torch.from_numpy(values.reshape(info.shape)).to(dtype)


def _unpermute(w, n_head: int):
    """Undo llama.cpp's q/k row order (the two halves of each head interleaved) -> HF rotate-half order."""
    from fuselm.quant.formats import QuantWeight

    if isinstance(w, QuantWeight):  # a permutation of output rows: reorder the quantised rows
        return w.rows(_unpermute(torch.arange(w.out_features), n_head))
    out = w.shape[0]
    rest = w.shape[1:]
    w = w.reshape(n_head, out // n_head // 2, 2, *rest)  # [H, D/2, 2, (in)]
    return w.transpose(1, 2).reshape(out, *rest)  # [H*D, (in)]


_LAYER_NAMES = {  # GGUF "blk.{i}.<key>" -> HF "model.layers.{i}.<value>"
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    **{f"attn_{p}.{kind}": f"self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")},
    **{f"ffn_{p}.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_QK_NORM_NAMES = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
# Families whose layers have more (or other) tensors than Llama's: their names on top of _LAYER_NAMES.
_MOE_NAMES = {  # experts stacked [E, N, K] under one name each (models/mixtral.py reads them), the router,
    # Qwen2-MoE's shared expert and its gate
    "ffn_gate_inp.weight": "mlp.gate.weight", "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    **{f"ffn_{p}_exps.weight": f"mlp.experts.{p}_proj.weight" for p in ("gate", "up", "down")},
    **{f"ffn_{p}_shexp.weight": f"mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")},
}
# whether each MoE architecture renormalises the top-k routing weights when the file does not say
_MOE_RENORMALIZE = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}
_ARCH_LAYER_NAMES = {
    "llama": _MOE_NAMES,  # Mixtral
    "qwen2moe": _MOE_NAMES,
    "qwen3moe": {**_QK_NORM_NAMES, **_MOE_NAMES},
    "olmoe": {**_QK_NORM_NAMES, **_MOE_NAMES},
    "qwen3": _QK_NORM_NAMES,
    "gemma3": {**_QK_NORM_NAMES, "post_attention_norm.weight": "post_attention_layernorm.weight",
               "ffn_norm.weight": "pre_feedforward_layernorm.weight",
               "post_ffw_norm.weight": "post_feedforward_layernorm.weight"},
}
# llama.cpp's converter stores Gemma's norm weights as 1 + weight (its RMSNorm multiplies by the
# stored weight); HF stores the offset from 1.
_NORM_PLUS_ONE = {"gemma3"}


def _hf_name(name: str, arch: str = "llama") -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        table = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(arch, {})}
        if parts[2] in table:
            return f"model.layers.{parts[1]}.{table[parts[2]]}"
    return None


def _llama3_rope(freq_factors: np.ndarray, head_dim: int, theta: float, original: int | None) -> dict:
    """Llama 3.1 rope scaling from the per-frequency factors llama.cpp stores in `rope_freqs.weight`.

    HF's rule divides inv_freq by `factor` where wavelen > original/low, keeps it where wavelen <
    original/high, and in between uses 1/f = (1-s)/factor + s with s = (original/wavelen - low) /
    (high - low): a line s = a/wavelen + b. The factors fix a and b, not all three parameters, so
    we take `original` from the metadata when given, else low = 1 (Llama 3.1's own choice).
    """
    f = freq_factors.astype(np.float64)  # [D/2]
    factor = float(f.max())
    x = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim) / (2 * np.pi)  # [D/2] 1/wavelen
    s = (1 / f - 1 / factor) / (1 - 1 / factor)  # [D/2] 1 = untouched, 0 = fully scaled
    mid = (s > 1e-4) & (s < 1 - 1e-4)
    low, high = 1.0, 4.0
    if mid.sum() >= 2:
        a, b = np.polyfit(x[mid], s[mid], 1)
        orig = original or (round(-a / b) if b < 0 else 8192)
        low, high = -b * orig / a, (1 - b) * orig / a
    elif mid.sum() == 1:  # Llama 3.1's low/high; the one point gives original
        orig = original or round((s[mid][0] * (high - low) + low) / x[mid][0])
    else:  # original/low must lie above every unscaled wavelength*4 and below every scaled one
        kept, scaled = 1 / x[s >= 0.5], 1 / x[s < 0.5]
        lo, hi = (kept.max() * high if kept.size else 1.0), (scaled.min() if scaled.size else 1e9)
        orig = original or round(float(np.sqrt(lo * hi)))
    low, high = round(float(low), 6), round(float(high), 6)  # undo float32 noise: 1.0, 4.0
    smooth = np.clip((orig * x - low) / (high - low), 0.0, 1.0)
    if not np.allclose(1 / ((1 - smooth) / factor + smooth), f, rtol=1e-3):
        raise _Corrupt("its rope_freqs.weight factors do not follow Llama 3 rope scaling, the only kind fuselm reads")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": int(orig)}


def _config(meta: dict[str, Any], arch: str, tensors: dict[str, _TensorInfo], buf: mmap.mmap) -> ModelConfig:
    def get(key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise _Corrupt(f"the metadata key {full!r} is missing")
            return default
        return meta[full]

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    kv_heads = get("attention.head_count_kv", heads)
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads)
    theta = float(get("rope.freq_base", 10000.0))
    # The embedding's rows are what the model must be built with; metadata and token list are fallbacks.
    tokens = meta.get("tokenizer.ggml.tokens")
    embd = tensors.get("token_embd.weight")
    vocab = embd.shape[0] if embd is not None else (get("vocab_size") or len(tokens or ()))
    context = int(get("context_length", 2048))
    scaling = None
    stype = get("rope.scaling.type")
    if "rope_freqs.weight" in tensors:
        factors = _read_tensor(buf, tensors["rope_freqs.weight"], torch.float32).numpy()  # [D/2]
        if not np.allclose(factors, 1.0):
            original = get("rope.scaling.original_context_length")
            scaling = _llama3_rope(factors, head_dim, theta, int(original) if original else None)
    elif stype and stype != "none":
        scaling = {"rope_type": str(stype), "factor": float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length"):
            scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                  "tokenizer.ggml.eom_token_id") if k in meta]
    hf_config: dict[str, Any] = {}
    if arch == "gemma3":  # HF-named settings models/gemma3.py reads; llama.cpp fixes the pattern at 6
        hf_config = {"sliding_window": int(get("attention.sliding_window", 512)), "sliding_window_pattern": 6,
                     "rope_theta": theta, "rope_local_base_freq": float(get("rope.freq_base_swa", 10000.0)),
                     "rope_scaling": scaling, "query_pre_attn_scalar": head_dim,
                     "final_logit_softcapping": get("final_logit_softcapping"),
                     "hidden_activation": "gelu_pytorch_tanh"}
        if tokens and "<end_of_turn>" in tokens:  # the end of a chat turn ends generation, as in HF's config
            eos.append(tokens.index("<end_of_turn>"))
    if get("expert_count"):
        hf_config = _moe_hf_config(get, arch, tensors)
    return ModelConfig(
        architecture="MixtralForCausalLM" if arch == "llama" and hf_config else _ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_hidden_layers=int(get("block_count", required=True)),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=context,
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=list(dict.fromkeys(eos)),
        hf_config=hf_config,
    )


def _moe_hf_config(get, arch: str, tensors: dict[str, _TensorInfo]) -> dict[str, Any]:
    """The HF-named MoE settings the MoE families read (models/mixtral.py and the files built on it)."""
    layers = int(get("block_count", required=True))
    experts = int(get("expert_count"))
    return {"num_experts": experts, "num_local_experts": experts, "num_experts_per_tok": int(get("expert_used_count")),
            "moe_intermediate_size": int(get("expert_feed_forward_length") or get("feed_forward_length")),
            "shared_expert_intermediate_size": get("expert_shared_feed_forward_length"),
            "norm_topk_prob": bool(get("expert_weights_norm", _MOE_RENORMALIZE.get(arch, False))),
            "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors],
            "qkv_bias": "blk.0.attn_q.bias" in tensors, "clip_qkv": get("attention.clamp_kqv")}


def _expected_names(config: ModelConfig, arch: str = "llama") -> set[str]:
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.o_proj.weight"]
    per_layer += [f"self_attn.{p}_proj.weight" for p in "qkv"]
    per_layer += [n for n in _ARCH_LAYER_NAMES.get(arch, {}).values() if n not in _MOE_NAMES.values()]
    if config.attention_bias:
        per_layer += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    names = {f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in per_layer}
    moe = config.hf_config if "num_experts_per_tok" in config.hf_config else None
    for i in range(config.num_hidden_layers if moe else 0):  # sparse layers: the router and experts, no MLP
        if i not in moe["mlp_only_layers"]:
            p = f"model.layers.{i}.mlp."
            names -= {p + f"{n}_proj.weight" for n in ("gate", "up", "down")}
            names |= {p + "gate.weight", *(p + f"experts.{n}_proj.weight" for n in ("gate", "up", "down"))}
            if moe["shared_expert_intermediate_size"]:
                shared = (p + f"shared_expert.{n}_proj.weight" for n in ("gate", "up", "down"))
                names |= {p + "shared_expert_gate.weight", *shared}
    names |= {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    return names


def _load_weights(buf: mmap.mmap, tensors: dict[str, _TensorInfo], config: ModelConfig, arch: str,
                  dtype: torch.dtype, keep_quantized: bool, rank_shard=None) -> dict[str, torch.Tensor]:
    mapping: dict[str, str] = {}
    for name in tensors:
        hf = _hf_name(name, arch)
        if hf is None and name != "rope_freqs.weight":
            raise _Corrupt(f"it has tensor {name!r}, which a plain {arch} model does not have "
                           "(an unsupported variant of the architecture?)")
        if hf is not None:
            mapping[name] = hf
    missing = sorted(_expected_names(config, arch) - set(mapping.values()))
    if missing:
        raise _Corrupt(f"it lacks the weights {missing[:4]}{' ...' if len(missing) > 4 else ''}")

    def one(name: str) -> tuple[str, torch.Tensor]:
        hf = mapping[name]
        try:
            t = _read_tensor(buf, tensors[name], dtype, keep_quantized and hf.endswith(".weight"))
            if arch == "llama" and ".self_attn.q_proj." in hf:
                t = _unpermute(t, config.num_attention_heads)
            elif arch == "llama" and ".self_attn.k_proj." in hf:
                t = _unpermute(t, config.num_key_value_heads)
            elif arch in _NORM_PLUS_ONE and hf.endswith("norm.weight"):
                t = t - 1
            elif hf.endswith("shared_expert_gate.weight") and t.dim() == 1:
                t = t.unsqueeze(0)  # llama-quantize writes Qwen2-MoE's [1, hidden] gate as [hidden]
            if rank_shard is not None:  # a tensor-parallel rank keeps its part; the whole tensor goes
                t = rank_shard.apply(hf, t)
        except (ValueError, RuntimeError) as exc:  # a shape that does not fit the config
            raise _Corrupt(f"tensor {name!r} {tensors[name].shape} cannot be read as {hf} ({exc})") from None
        return hf, t

    # Hundreds of small casts: torch's intra-op thread pool costs more in wake-ups than it saves
    # (measured 1.6 s vs 0.04 s in all on 2 busy cores), so cast single-threaded. Worker threads do
    # not help either: gguf's dequantisation is many small numpy calls that hold the GIL.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weights = {hf: t for hf, t in map(one, mapping) if t is not None}  # None: another rank's expert
    finally:
        torch.set_num_threads(threads)
    if keep_quantized:
        from fuselm.quant.gguf_quants import log_dequantised_types

        log_dequantised_types({n: tensors[n].ggml_type for n in mapping}, mapping, weights, set(_FLOAT_TYPES))
    return weights


def _stat(path: Path) -> os.stat_result:
    """The file's stat, once it is a file that can hold a GGUF header."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} not found" + (" (it is a directory)" if path.exists() else ""))
    st = path.stat()
    if st.st_size < 24:
        raise ValueError(f"{path} is not a GGUF file: it has only {st.st_size} bytes; {_FIX}")
    return st


def _open(path: Path) -> mmap.mmap:
    _stat(path)
    with open(path, "rb") as fh:
        # ACCESS_COPY: writable (copy-on-write) pages, so torch.frombuffer gets a writable buffer.
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)


def _tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    try:
        return build_gguf_tokenizer(meta)
    except ValueError as exc:  # already says what is wrong and what to do
        raise ValueError(f"{path}: {exc}") from None
    except Exception as exc:  # tokenizers' own errors, e.g. a merge of tokens not in the vocabulary
        raise _Corrupt(f"its tokenizer cannot be built ({exc})") from None


@functools.lru_cache(maxsize=1)
def _parsed_header(path: str, version: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, _TensorInfo]]:
    """The parsed header of one version of a file (its inode, size and change times in the key): an engine that
    first asks whether a GGUF keeps quantised weights (dtype auto) and then loads it parses the header once (39 ms
    for the embedded model). Metadata arrays are copies, so nothing here refers to the closed map. Read only by
    its callers."""
    del version  # the cache key only
    buf = _open(Path(path))
    try:
        return _parse(buf)
    finally:
        buf.close()


def _header(path: Path) -> tuple[dict[str, Any], dict[str, _TensorInfo]]:
    st = _stat(path)
    return _parsed_header(str(path.resolve()), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


def _from_header(path: Path, read):
    """read(meta, tensors) over a GGUF file's parsed header; a corrupt one is a ValueError."""
    try:
        return read(*_header(path))
    except _Corrupt as exc:
        raise ValueError(f"{path} is not a usable GGUF file: {exc}; {_FIX}") from None


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer of a GGUF file (any architecture): reads the header, no weights."""
    path = Path(path)
    return _from_header(path, lambda meta, _: _tokenizer(meta, path))


def gguf_keeps_quantized_weights(path: str | Path) -> bool:
    """Whether load_gguf(keep_quantized=True) keeps any matrix of this file quantised (reads the header only)."""
    from fuselm.quant.gguf_quants import KEPT_TYPES

    return _from_header(Path(path), lambda _, tensors: any(
        info.ggml_type in KEPT_TYPES and len(info.shape) in (2, 3) for info in tensors.values()))


def load_gguf(path: str | Path, dtype: torch.dtype, keep_quantized: bool = False, shard=None) -> LoadedModel:
    """Config, HF-named weights in `dtype` and tokenizer of a GGUF file of a registered architecture. With
    keep_quantized, weights whose ggml type maps exactly onto a fuselm format are QuantWeights. With
    `shard` (a tensor-parallel rank's TensorShard), each weight is cut to the rank's part as it is read."""
    path = Path(path)
    buf = _open(path)
    try:
        meta, tensors = _header(path)
        arch = meta.get("general.architecture")
        if arch not in _ARCHITECTURES:
            raise ValueError(
                f"{path}: GGUF architecture {arch!r} is not supported; fuselm loads GGUF architectures "
                f"{sorted(_ARCHITECTURES)} ({supported_architectures()}). Use such a model, "
                "or its HF directory if its architecture is supported there"
            )
        try:
            config = _config(meta, arch, tensors, buf)
        except (TypeError, ValueError, KeyError) as exc:
            raise _Corrupt(f"its {arch} metadata is invalid ({type(exc).__name__}: {exc})") from None
        rank_shard = shard.bind(config) if shard is not None else None
        weights = _load_weights(buf, tensors, config, arch, dtype, keep_quantized, rank_shard)
        tokenizer = _tokenizer(meta, path)
    except _Corrupt as exc:
        raise ValueError(f"{path} is not a usable GGUF file: {exc}; {_FIX}") from None
    finally:
        try:
            buf.close()
        except BufferError:  # a view is still alive somewhere; the map closes when it is collected
            pass
    if not config.eos_token_ids:
        config.eos_token_ids = list(tokenizer.eos_token_ids)
    if arch == "gemma3" and tokenizer.chat_template is None:  # Gemma 3 GGUFs (the base model's) carry none
        from fuselm.models.gemma3 import CHAT_TEMPLATE

        tokenizer.chat_template = CHAT_TEMPLATE
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, generation_defaults={},
                       source=str(path))
