"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2) over a packed 1-D token batch.

Differences inside the family are config switches: q/k/v biases (Qwen2), GQA, tied embeddings,
rope_theta and Llama 3 rope scaling. q/k/v and gate/up projections are fused into one matmul each.
Input is `input_ids [T]` and `positions [T]` for all tokens of all requests in the step; attention
reads the rest of the batch layout from the forward context (fuselm.runner.attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.config import ModelConfig
from fuselm.linear.method import TorchLinear
from fuselm.runner.attention import get_attention_metadata, paged_attention


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # [D/2]
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling.get("low_freq_factor", 1.0)
        high_freq_factor = scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_len / low_freq_factor
        high_freq_wavelen = old_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type not in ("default", None):
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, linear, llama3 are)")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, HF rotate-half layout, in the model dtype (as HF applies them).

    The tables are gathered once per forward (`tables`), not once per layer: with the KV cache
    streaming through the CPU caches, each per-layer gather missed to DRAM (measured ~160 us per
    call at 128 rows). The sin table carries rotate-half's sign: x*cos + swap_halves(x)*signed_sin.
    """

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        signed_sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("signed_sin", signed_sin.to(dtype), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, signed sin), each [T, 1, D]."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x: [T, H, D] (q and k heads side by side) -> rotated x."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((x2, x1), dim=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = TorchLinear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = TorchLinear(self.q_size, config.hidden_size, bias=False)
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, kv_heads, head_dim], set by the runner
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None  # int8 cache only: [num_blocks, block_size, kv_heads] scales
        self.v_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, q_size + 2 kv_size]
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads are adjacent in the fused projection: rotate them in one go.
        qk = RotaryEmbedding.apply(qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim), *rope)  # [T, Hq+Hkv, D]
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, self.scale, self.k_scale, self.v_scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = TorchLinear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = TorchLinear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.cpu_kernels = None  # fuselm.kernels.cpu.CpuKernels: one C pass per row (3-10x faster, measured)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernels is not None and x.dim() == 2 and x.dtype == self.weight.dtype:
            return self.cpu_kernels.rms_norm(x, self.weight, self.eps)
        # Like HF: normalise in float32, then scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config, max_positions, dtype)
        # a LinearMethod; with tied embeddings set by load_hf_weights over the embedding table
        self.lm_head = None if config.tie_word_embeddings else TorchLinear(config.hidden_size, config.vocab_size)
        self.c_layers = None  # fuselm.kernels.c_layers.CLayers: the layers' math in C calls (execution plan)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rope.tables(positions)  # ([T, 1, D], [T, 1, D])
        c_layers = self.c_layers
        if c_layers is not None:
            meta = get_attention_metadata()
            t = input_ids.shape[0]
            x = x.contiguous()
            cos, sin = rope[0].reshape(t, -1).contiguous(), rope[1].reshape(t, -1).contiguous()
            if (meta.num_query_rows == t and not meta.prefill_rows
                    and meta.cpu_kernels is not None and meta.decode_block_table is not None):
                # every token a query row: decodes, and speculative tokens being verified
                c_layers.run(x, cos, sin, meta.decode_block_table, meta.decode_ctx_lens,
                             None if meta.num_single_rows < 0 else meta.num_single_rows)
                return self.norm(x)
            if c_layers.takes_prompt_step(t):  # prompt chunks: each layer in two C calls around attention
                for i, layer in enumerate(self.layers):
                    attn = layer.self_attn
                    q, k, v = c_layers.attention_inputs(i, x, cos, sin)
                    o = paged_attention(q, k, v, attn.k_cache, attn.v_cache, attn.scale)  # [T, Hq, D]
                    c_layers.attention_outputs(i, x, o)
                return self.norm(x)
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] logits in the model dtype (the sampler widens where it must:
        a greedy batch takes the max of bf16 logits directly, skipping a [S, vocab] float copy)."""
        return self.lm_head(hidden)  # [S, vocab]

    def linear_methods(self):
        """(parent module, attribute, role) of every LinearMethod slot: what the execution plan
        chooses a method for. Roles name the projection kind across layers."""
        for layer in self.layers:
            yield layer.self_attn, "qkv_proj", "qkv"
            yield layer.self_attn, "o_proj", "o"
            yield layer.mlp, "gate_up_proj", "gate_up"
            yield layer.mlp, "down_proj", "down"
        yield self, "lm_head", "lm_head"

    def linear_sources(self):
        """(parent module, attribute, HF weight names fused in output order, HF bias names or None) for
        every projection of every layer: the one table weight loading and quantisation both follow."""
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            biases = [p + f"self_attn.{n}_proj.bias" for n in "qkv"] if attn.qkv_proj.bias is not None else None
            yield attn, "qkv_proj", [p + f"self_attn.{n}_proj.weight" for n in "qkv"], biases
            yield attn, "o_proj", [p + "self_attn.o_proj.weight"], None
            yield mlp, "gate_up_proj", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], None
            yield mlp, "down_proj", [p + "mlp.down_proj.weight"], None

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up. Raises ValueError on missing/mismatched tensors.

        Consumes `weights`: each tensor leaves the dict as it is copied in, so a checkpoint is never
        held twice (a 1.5B model in fp32 is 6 GB). Projections already replaced by quantised modules
        (fuselm.quant.apply.install_quantized) took their tensors before and are skipped.
        """

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"weight {name!r} is missing from the checkpoint; the file is incomplete or not "
                                 "a supported Llama-family model")
            return weights.pop(name)

        def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
            if param.shape != value.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}, the config expects "
                                 f"{tuple(param.shape)}; config.json and the weights disagree")
            with torch.no_grad():
                param.copy_(value)

        if isinstance(self.embed_tokens, nn.Embedding):
            put(self.embed_tokens.weight, take("model.embed_tokens.weight"), "model.embed_tokens.weight")
        put(self.norm.weight, take("model.norm.weight"), "model.norm.weight")
        if isinstance(self.lm_head, TorchLinear):
            put(self.lm_head.weight, take("lm_head.weight"), "lm_head.weight")
        else:  # tied, or already installed quantised
            weights.pop("lm_head.weight", None)
        for parent, attr, names, bias_names in self.linear_sources():
            module = getattr(parent, attr)
            if not isinstance(module, TorchLinear):
                continue
            label = names[0].rsplit(".", 2)[0] + f".{attr}"
            put(module.weight, torch.cat([take(n) for n in names]), label + ".weight")
            if bias_names:
                put(module.bias, torch.cat([take(n) for n in bias_names]), label + ".bias")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            put(layer.input_layernorm.weight, take(p + "input_layernorm.weight"), p + "input_layernorm.weight")
            put(layer.post_attention_layernorm.weight, take(p + "post_attention_layernorm.weight"),
                p + "post_attention_layernorm.weight")
        leftovers = [n for n in weights if not n.endswith("rotary_emb.inv_freq")]
        if leftovers:
            raise ValueError(f"unexpected weights in the checkpoint: {leftovers[:5]}...; not a Llama-family model?")
        if self.lm_head is None:  # tied: the LM head multiplies by the embedding table
            self.lm_head = TorchLinear.sharing(self.embed_tokens.weight)
