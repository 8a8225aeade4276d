"""Tiny random-weight HF models saved to disk, with a small trained BPE tokenizer: exact references.

Each model goes through transformers' own `save_pretrained` (safetensors, config.json,
generation_config.json) so fuselm's HF loading path is exercised for real, and the transformers
model in memory is the reference for logits and greedy continuations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Paris is the capital of France. Berlin is the capital of Germany. 0123456789",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse.",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def save_tokenizer(path: Path, vocab_size: int = 384) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "add_bos_token": True,
        "chat_template": CHATML, "model_max_length": 4096,
    }))


def make_tiny_model(path: Path, kind: str = "llama", tie: bool = False, seed: int = 0,
                    vocab_size: int = 384, layers: int = 2, hidden: int = 64, dtype=torch.float32):
    """Save a tiny random model of `kind` (llama | llama3 | qwen2 | mistral | qwen3 | gemma3) at `path`;
    return the HF model (eval, fp32)."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    save_tokenizer(path, vocab_size)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=4,
                  rms_norm_eps=1e-5)
    if kind == "llama":
        config = transformers.LlamaConfig(rope_theta=10000.0, **common)
    elif kind == "llama3":
        config = transformers.LlamaConfig(
            rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            **common)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(rope_theta=1000000.0, **common)
    elif kind == "mistral":
        config = transformers.MistralConfig(rope_theta=10000.0, sliding_window=4096, **common)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(rope_theta=1000000.0, head_dim=24, **common)
    elif kind in ("gemma3", "gemma3_llamacpp"):
        config = gemma3_tiny_config(common, llama_cpp_layout=kind == "gemma3_llamacpp")
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForCausalLM, "llama3": transformers.LlamaForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM, "gemma3": transformers.Gemma3ForCausalLM,
           "gemma3_llamacpp": transformers.Gemma3ForCausalLM}[kind]
    model = cls(config).to(dtype)
    with torch.no_grad():  # random biases so Qwen2's q/k/v biases are really tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif kind.startswith(("qwen3", "gemma3")) and name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)  # norms away from their init (1, or Gemma's 0)
    model.save_pretrained(path, safe_serialization=True)
    return model.float().eval()


# The tiny Gemma 3's sliding window: shorter than most test prompts, so the window changes results.
GEMMA3_WINDOW = 24


def gemma3_tiny_config(common: dict, llama_cpp_layout: bool = False):
    """Gemma3TextConfig with sliding (local rope 10k) and full layers (rope 1e6, linear scaling x2),
    a query_pre_attn_scalar other than head_dim and final logit soft-capping, so each is tested.

    llama_cpp_layout: what a GGUF can hold instead (llama.cpp fixes these for gemma3): 6 layers with
    the 6th global, query_pre_attn_scalar = head_dim, no soft-capping."""
    import transformers

    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
    sliding, full = "sliding_attention", "full_attention"
    if llama_cpp_layout:
        options = dict(common, num_hidden_layers=6, query_pre_attn_scalar=16, final_logit_softcapping=None,
                       layer_types=[sliding] * 5 + [full])
    else:
        options = dict(common, num_hidden_layers=4, query_pre_attn_scalar=24, final_logit_softcapping=30.0,
                       layer_types=[sliding, full, sliding, sliding])
    return transformers.Gemma3TextConfig(head_dim=16, sliding_window=GEMMA3_WINDOW, rope_parameters=rope,
                                         pad_token_id=0, **options)


@torch.no_grad()
def hf_last_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """Reference: logits of each prompt's last token, one prompt at a time (no padding)."""
    return torch.stack([model(torch.tensor([p])).logits[0, -1].float() for p in prompts])


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         min_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()
