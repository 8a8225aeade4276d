"""Write a transformers model to a GGUF file the way llama.cpp's convert_hf_to_gguf.py does.

Tests use it to make GGUF files whose true contents are known exactly (the HF model in memory),
so the GGUF loader can be checked weight by weight and, in model tests, logit by logit:

    write_gguf_from_hf(model, tokenizer_source, out_path, quantize=None) -> Path

- model: a `LlamaForCausalLM` (written as arch "llama", q/k rows permuted as llama.cpp does), a
  `Qwen2ForCausalLM` (arch "qwen2", q/k/v biases, no permutation), a `Qwen3ForCausalLM` (arch
  "qwen3", q/k norms) or a `Gemma3ForCausalLM` (arch "gemma3": norms stored as 1 + weight, the
  sliding window; llama.cpp assumes every 6th layer global and query_pre_attn_scalar = head_dim). Llama 3 rope scaling becomes a
  `rope_freqs.weight` tensor, linear rope scaling the `rope.scaling.*` keys, as in the converter.
- tokenizer_source: a .gguf file whose `tokenizer.*` metadata is copied (e.g. the embedded
  SmolLM2, vocab 49152: the model's vocab_size must then match), an HF directory with a byte-level
  BPE tokenizer.json (+ tokenizer_config.json), or None for a synthetic byte-level vocabulary of
  exactly `vocab_size` tokens (3 ChatML specials, the 256 bytes, then merged letter pairs).
- quantize: {HF parameter name: gguf.GGMLQuantizationType} for tensors to store quantised (via
  `gguf.quants.quantize`); every other tensor is written as F32.
- tokenizer_pre: overrides `tokenizer.ggml.pre` (e.g. "qwen2", "llama-bpe") to test other
  pre-tokenizers on the same vocabulary.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LAYER = {  # HF suffix after "model.layers.{i}." -> GGUF suffix after "blk.{i}."
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


_QK_NORMS = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
_ARCH_LAYER = {  # families with other or more layer tensors than Llama's, on top of _LAYER
    "qwen3": _QK_NORMS,
    "gemma3": {**_QK_NORMS, "post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
}


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_ARCH_LAYER.get(arch, {}).get(rest) or _LAYER[rest]}"


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, row pairs (j, j + D/2) become adjacent."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(head_dim: int, theta: float, rope: dict) -> np.ndarray:
    """The per-frequency divisors convert_hf_to_gguf.py stores as rope_freqs.weight for Llama 3.1."""
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@lru_cache(maxsize=4)
def _gguf_tokenizer_fields(path: str) -> tuple:
    reader = gguf.GGUFReader(path)
    fields = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            main = field.types[0]
            sub = field.types[-1] if main == GGUFValueType.ARRAY else None
            fields.append((key, field.contents(), main, sub))
    return tuple(fields)


def _byte_chars() -> list[str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _write_tokenizer(w: GGUFWriter, source: str | Path | None, vocab_size: int, pre: str | None) -> None:
    if source is not None and str(source).endswith(".gguf"):
        for key, value, main, sub in _gguf_tokenizer_fields(str(source)):
            w.add_key_value(key, pre if key == "tokenizer.ggml.pre" and pre else value, main, sub)
        return
    if source is not None:  # an HF directory: tokenizer.json (byte-level BPE) + tokenizer_config.json
        tj = json.loads((Path(source) / "tokenizer.json").read_text())
        cfg_file = Path(source) / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        vocab = dict(tj["model"]["vocab"])
        for added in tj.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
        tokens = [f"[PAD{i}]" for i in range(max(vocab_size, max(vocab.values()) + 1))]
        for tok, i in vocab.items():
            tokens[i] = tok
        special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
        types = [3 if i in special else 1 for i in range(len(tokens))]
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or "default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for key, adder in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                           ("pad_token", w.add_pad_token_id), ("unk_token", w.add_unk_token_id)):
            if isinstance(cfg.get(key), str) and cfg[key] in vocab:
                adder(vocab[cfg[key]])
        w.add_add_bos_token(bool(cfg.get("add_bos_token", False)))
        if cfg.get("chat_template"):
            w.add_chat_template(cfg["chat_template"])
        return
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens, merges = specials + _byte_chars(), []
    letters = "etaoinshrdlucmfw"
    pairs = [(a, b) for a in letters for b in letters]
    if vocab_size < len(tokens) or vocab_size - len(tokens) > len(pairs):
        raise ValueError(f"synthetic vocabularies hold {len(tokens)}..{len(tokens) + len(pairs)} tokens")
    for a, b in pairs[:vocab_size - len(tokens)]:
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or "smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    if merges:
        w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)


def write_gguf_from_hf(model, tokenizer_source: str | Path | None, out_path: str | Path,
                       quantize: dict[str, GGMLQuantizationType] | None = None,
                       tokenizer_pre: str | None = None) -> Path:
    """See the module docstring. Returns out_path."""
    cfg = model.config
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}[cfg.model_type]
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if "full_attention" in rope:  # Gemma 3: the file holds the global layers' rope; local is llama.cpp's 10000
        rope = dict(rope["full_attention"])
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))

    w = GGUFWriter(str(out_path), arch)
    w.add_name("tiny test model")
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(theta)
    w.add_file_type(0)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads and arch != "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma3":  # as the converter: the window; the layer pattern (every 6th global) is llama.cpp's
        w.add_sliding_window(cfg.sliding_window)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    _write_tokenizer(w, tokenizer_source, cfg.vocab_size, tokenizer_pre)

    quantize = quantize or {}
    if rope_type == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, theta, rope))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the converter writes no output.weight
        t = tensor.detach().float()
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            t = llama_cpp_permute(t, heads)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            t = llama_cpp_permute(t, kv_heads)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1  # the converter stores Gemma's norms as 1 + weight
        data = t.numpy()
        if name in quantize:
            qtype = quantize[name]
            w.add_tensor(gguf_name(name, arch), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name, arch), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out_path)
