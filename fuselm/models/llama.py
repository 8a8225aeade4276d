"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2) over a packed 1-D token batch.

Differences inside the family are config switches: q/k/v biases (Qwen2), GQA, tied embeddings,
rope_theta and Llama 3 rope scaling. q/k/v and gate/up projections are fused into one matmul each.
Input is `input_ids [T]` and `positions [T]` for all tokens of all requests in the step; attention
reads the rest of the batch layout from the forward context (fuselm.layers.paged_attention).
"""

from __future__ import annotations

import torch
from torch import nn

from fuselm.config import ModelConfig
from fuselm.layers.attention import Attention
from fuselm.layers.linear import TorchLinear
from fuselm.layers.mlp import MLP
from fuselm.layers.norm import RMSNorm
from fuselm.layers.rotary import RotaryEmbedding
from fuselm.layers.paged_attention import get_attention_metadata, paged_attention


def sliding_windows(config: ModelConfig, max_positions: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention) as HF applies `config.sliding_window`
    (Mistral, Qwen2 with use_sliding_window): to the layers `layer_types` names "sliding_attention",
    or to every layer when the config has no layer_types. A window the context can never outgrow
    (>= max_positions) is no window."""
    window = config.sliding_window
    if not window or window >= max_positions:
        return [None] * config.num_hidden_layers
    types = config.hf_config.get("layer_types") or ["sliding_attention"] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, sliding_window=window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    supports_c_layers = True  # decode_layers.c implements exactly this layer (kernels/c_layers.py)

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, window) for window in sliding_windows(config, max_positions))
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
            if (meta.num_query_rows == t and not meta.prefill_rows and not meta.chunk_query_rows
                    and meta.cpu_kernels is not None and meta.decode_block_table is not None
                    and not meta.snapkv and not meta.h2o):  # scoring rows need each layer's q
                # every token a query row: decodes, and speculative tokens being verified
                c_layers.run(x, cos, sin, meta.decode_block_table, meta.decode_ctx_lens,
                             None if meta.num_single_rows < 0 else meta.num_single_rows,
                             None if meta.cascade is None else meta.cascade.encoded)
                return self.norm(x)
            if c_layers.takes_prompt_step(t):  # prompt chunks: each layer in two C calls around attention
                for i, layer in enumerate(self.layers):
                    attn = layer.self_attn
                    q, k, v = c_layers.attention_inputs(i, x, cos, sin)
                    o = paged_attention(q, k, v, attn.k_cache, attn.v_cache, attn.scale,
                                        attn.k_scale, attn.v_scale)  # [T, Hq, D]
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
        return dense_linear_methods(self)

    def linear_sources(self):
        """(parent module, attribute, HF weight names fused in output order, HF bias names or None) for
        every projection of every layer: the one table weight loading and quantisation both follow."""
        for i, layer in enumerate(self.layers):
            yield from layer.self_attn.linear_sources(f"model.layers.{i}.self_attn.")
            yield from layer.mlp.linear_sources(f"model.layers.{i}.mlp.")

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


def dense_linear_methods(model):
    """The LinearMethod slots of a model whose layers have `self_attn` (qkv, o) and a dense `mlp`
    (gate_up, down), and its `lm_head`: (parent module, attribute, role)."""
    for layer in model.layers:
        yield layer.self_attn, "qkv_proj", "qkv"
        yield layer.self_attn, "o_proj", "o"
        yield layer.mlp, "gate_up_proj", "gate_up"
        yield layer.mlp, "down_proj", "down"
    yield model, "lm_head", "lm_head"
