"""Tiny random MoE models built with transformers' own config classes and saved as HF directories,
for the MoE tests (tests/test_moe_*.py): the transformers model in memory is the reference."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import save_tokenizer

VOCAB = 384
MOE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def make_tiny_moe(path: Path, kind: str, seed: int = 0, layers: int = 2, hidden: int = 64, num_experts: int = 8,
                  top_k: int = 2):
    """Save a tiny random `kind` MoE model at `path`; return the HF model (eval, fp32)."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    save_tokenizer(path, VOCAB)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=4,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, num_experts_per_tok=top_k)
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=96, num_local_experts=num_experts, **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "qwen2_moe":  # shared expert, no renormalisation, one dense layer
        config = transformers.Qwen2MoeConfig(intermediate_size=80, moe_intermediate_size=32, num_experts=num_experts,
                                             shared_expert_intermediate_size=48, norm_topk_prob=False,
                                             mlp_only_layers=[1] if layers > 1 else [], **common)
        cls = transformers.Qwen2MoeForCausalLM
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=80, moe_intermediate_size=32, num_experts=num_experts,
                                             norm_topk_prob=True, head_dim=32, **common)
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "olmoe":
        config = transformers.OlmoeConfig(intermediate_size=32, num_experts=num_experts, norm_topk_prob=False,
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
