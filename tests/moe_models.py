"""Tiny random MoE models built with transformers' own config classes and saved as HF directories,
for the MoE tests (tests/test_moe_*.py): the transformers model in memory is the reference."""

from __future__ import annotations

from pathlib import Path

import torch

from fuselm.layers.moe import route
from tiny_models import save_tokenizer

VOCAB = 384
MOE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def make_tiny_moe(path: Path, kind: str, seed: int = 0, layers: int = 2, hidden: int = 64, num_experts: int = 8,
                  top_k: int = 2, expert_intermediate: int | None = None):
    """Save a tiny random `kind` MoE model at `path`; return the HF model (eval, fp32). expert_intermediate
    overrides each expert's width (GGUF's K-quants need multiples of 256)."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    save_tokenizer(path, VOCAB)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=4,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, num_experts_per_tok=top_k)
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=expert_intermediate or 96, num_local_experts=num_experts, **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "qwen2_moe":  # shared expert, no renormalisation, one dense layer
        config = transformers.Qwen2MoeConfig(intermediate_size=80, moe_intermediate_size=expert_intermediate or 32, num_experts=num_experts,
                                             shared_expert_intermediate_size=48, norm_topk_prob=False,
                                             mlp_only_layers=[1] if layers > 1 else [], **common)
        cls = transformers.Qwen2MoeForCausalLM
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=80, moe_intermediate_size=expert_intermediate or 32, num_experts=num_experts,
                                             norm_topk_prob=True, head_dim=32, **common)
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "olmoe":
        config = transformers.OlmoeConfig(intermediate_size=expert_intermediate or 32, num_experts=num_experts, norm_topk_prob=False,
                                          clip_qkv=8.0, **common)
        cls = transformers.OlmoeForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # transformers initialises some of these to zeros or ones: make every weight matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
            elif name.endswith("mlp.gate.weight") or "gate.weight" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return model.float().eval()


# HF kind -> GGUF architecture, as llama.cpp's convert_hf_to_gguf.py writes each
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
_LAYER_TENSORS = {  # HF name after "model.layers.{i}." -> GGUF name after "blk.{i}."
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"self_attn.{p}_proj.{kind}": f"attn_{p}.{kind}" for p in "qkv" for kind in ("weight", "bias")},
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    **{f"mlp.shared_expert.{p}_proj.weight": f"ffn_{p}_shexp.weight" for p in ("gate", "up", "down")},
    **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")},
}


# K-quant types gguf.quants cannot quantise: their float16 super-block scale fields (byte offset, spread),
# small enough that the random weights they scale stay around 0.05
_RANDOM_BLOCK_SCALES = {"Q4_K": ((0, 2e-4), (2, 2e-4)), "Q6_K": ((208, 5e-5),)}


def _random_blocks(qtype, shape: tuple[int, ...], seed: int):
    """Random bytes of `qtype` blocks for a float tensor of `shape` (the file's weights are then whatever
    they dequantise to; tests compare against gguf's own dequantisation)."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(int(np.prod(shape)) // block, size), dtype=np.uint8)
    for offset, spread in _RANDOM_BLOCK_SCALES[qtype.name]:
        halves = (rng.standard_normal(raw.shape[0]) * spread).astype(np.float16)
        raw[:, offset:offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def write_moe_gguf(model, kind: str, tokenizer_dir: Path, out_path: Path, expert_type=None, layer_types=None,
                   flat_shared_gate: bool = False) -> Path:
    """Write an HF MoE model as convert_hf_to_gguf.py would: experts stacked as blk.{i}.ffn_{gate,up,down}_exps
    [E, N, K], q/k rows permuted for arch llama (Mixtral). expert_type: a GGMLQuantizationType for the
    stacked experts (None: F32); layer_types: {GGUF tensor suffix: type} for other 2-D weights;
    flat_shared_gate: Qwen2-MoE's shared-expert gate [1, hidden] written as [hidden], as llama-quantize writes it."""
    import gguf

    from gguf_writer import _write_tokenizer, llama_cpp_permute

    cfg = model.config
    arch = GGUF_ARCH[kind]
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_name(f"tiny {kind}")
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_expert_count(num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if hasattr(cfg, "moe_intermediate_size"):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", None):
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if hasattr(cfg, "norm_topk_prob"):
        w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    if getattr(cfg, "clip_qkv", None):
        w.add_clamp_kqv(float(cfg.clip_qkv))
    w.add_file_type(0)
    _write_tokenizer(w, tokenizer_dir, cfg.vocab_size, None)

    def add(name: str, t: torch.Tensor, qtype=None) -> None:
        data = t.numpy()
        if qtype is None:
            w.add_tensor(name, data)
        elif qtype.name in _RANDOM_BLOCK_SCALES:  # gguf cannot quantise K-quants: random blocks instead
            w.add_tensor(name, _random_blocks(qtype, data.shape, seed=len(name) + data.size), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    layer_types = layer_types or {}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for hf, name in top.items():
        add(name, state[hf])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for suffix, gguf_suffix in _LAYER_TENSORS.items():
            if p + suffix not in state:
                continue
            t = state[p + suffix]
            if arch == "llama" and suffix == "self_attn.q_proj.weight":
                t = llama_cpp_permute(t, cfg.num_attention_heads)
            elif arch == "llama" and suffix == "self_attn.k_proj.weight":
                t = llama_cpp_permute(t, cfg.num_key_value_heads)
            if flat_shared_gate and suffix == "mlp.shared_expert_gate.weight":
                t = t.reshape(-1)
            add(f"blk.{i}.{gguf_suffix}", t, layer_types.get(gguf_suffix) if t.dim() == 2 else None)
        if p + "mlp.experts.gate_up_proj" in state:  # transformers keeps experts stacked: [E, 2I, H], [E, H, I]
            gate, up = state[p + "mlp.experts.gate_up_proj"].chunk(2, dim=1)
            for proj, t in (("gate", gate), ("up", up), ("down", state[p + "mlp.experts.down_proj"])):
                add(f"blk.{i}.ffn_{proj}_exps.weight", t.contiguous(), expert_type)  # [E, N, K]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out_path)


def check_tokens_independent_of_batch(fast, hidden: int, num_experts: int, top_k: int, group: list[list[int]],
                                      threads: int) -> None:
    """Bit for bit, on `threads` threads: a token alone, and the tokens of `group` (their experts, one row each)
    together, get what they get among 40 other tokens (moe.c's general path). With few rows the grouped experts
    take moe_few_rows.c or moe_float.c, whole experts per thread where the routed experts divide evenly between
    the threads and items shared out otherwise, so 1-3 threads run both."""
    x = torch.randn(40 + len(group), hidden)
    weights, ids = route(torch.randn(40 + len(group), num_experts), top_k, renormalize=True)
    ids[40:] = torch.tensor(group)
    before = torch.get_num_threads()
    try:
        together = fast(x, ids, weights)
        torch.set_num_threads(threads)
        for t in (0, 17, 39):
            assert torch.equal(fast(x[t:t + 1], ids[t:t + 1], weights[t:t + 1])[0], together[t])
        assert torch.equal(fast(x[40:], ids[40:], weights[40:]), together[40:])
    finally:
        torch.set_num_threads(before)
