"""CLayers: runs every decoder layer of a step whose tokens are all query rows (decodes, verified
speculative tokens) in one C call (decode_layers.c), and the layers of steps with prompt chunks in
two C calls each, around the attention.

Used when a Llama-family model on CPU has every projection quantised (fuselm/quant) or packed
for fuselm's fp32 GEMM (dense_linear.py), and its activations in float32 (the KV cache float32,
bfloat16 or int8 with its scales): the C side then needs no torch op per
layer. The ctypes structures describing the layers (weight pointers, caches) are built once; a
step passes the residual stream, the rotary tables and the decode rows' block table.
The QuantWeights and caches must stay alive and in place, which the model and runner guarantee
(weights are never moved after load; caches are allocated once).
"""

from __future__ import annotations

import ctypes

import torch

from fuselm.kernels.abi import DTYPE_CODES, MAX_PARTS as _MAX_PARTS
from fuselm.kernels.abi import QLayer as _QLayer, QModelDims as _QModelDims, QPart as _QPart, QProj as _QProj
from fuselm.kernels.c_moe import MoELayers, unsupported_reason as _moe_unsupported_reason
from fuselm.layers.moe import MoEBlock
from fuselm.quant.tiles import TILED

# the structures mirror fuselm_kernels.h (fuselm/kernels/abi.py); their layout is checked when the library loads
_KV_DTYPES = {dtype: DTYPE_CODES[dtype] for dtype in (torch.float32, torch.bfloat16, torch.int8)}


def _proj(module) -> _QProj:
    from fuselm.kernels.dense_linear import DenseLinear

    proj = _QProj()
    if isinstance(module, DenseLinear):  # one float32 part in dense_linear.c's layout ("bits" 32)
        proj.num_parts = 1
        proj.parts[0] = _QPart(module.packed.data_ptr(), None, None, module.out_features, module.in_features, 0, 32, 0)
        proj.bias = None if module.bias is None else module.bias.data_ptr()
        return proj
    proj.num_parts = len(module.parts)
    for i, p in enumerate(module.parts):
        if isinstance(p, TILED):  # int4_rows16.c's or int8_rows16.c's tiles: the C side tells them by their missing scales
            proj.parts[i] = _QPart(p.tiles.data_ptr(), None, None, p.out_features, p.in_features, 32, p.bits,
                                   DTYPE_CODES[p.scale_dtype])
            continue
        proj.parts[i] = _QPart(p.qweight.data_ptr(), p.scales.data_ptr(), None if p.mins is None else p.mins.data_ptr(),
                               p.out_features, p.in_features, p.group_size, p.bits,
                               DTYPE_CODES[p.scales.dtype])
    proj.bias = None if module.bias is None else module.bias.data_ptr()
    return proj


def _all_projections(layer) -> tuple:
    """_projections, and an MoE layer's shared-expert projections (moe.c reads them through the layer's QMoe)."""
    mlp = layer.mlp
    if isinstance(mlp, MoEBlock) and mlp.shared_expert is not None:
        shared = mlp.shared_expert
        return (*_projections(layer), shared.gate_up_proj, shared.down_proj, shared.expert_gate)
    return _projections(layer)


def _projections(layer) -> tuple:
    """A decoder layer's projections, in the order decode_layers.c's QLayer holds them: q/k/v, o, then the
    dense MLP's gate/up and down, or an MoE layer's router (its experts are GroupedExperts', c_moe.py)."""
    attn, mlp = layer.self_attn, layer.mlp
    if isinstance(mlp, MoEBlock):
        return (attn.qkv_proj, attn.o_proj, mlp.gate)
    return (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)


class CLayers:
    """The decoder layers' math as C calls over the model's own weights and caches: a step whose
    tokens are all query rows runs every layer in one call (`run`); a step with prompt chunks runs
    each layer in two calls around the attention (`attention_inputs`, `attention_outputs`)."""

    def __init__(self, model, kernels) -> None:
        layers = model.layers
        self._keep = []  # float32 copies of biases / norms whose pointers the structures hold
        self.layers = (_QLayer * len(layers))()
        self.moe = MoELayers(model, _proj)
        for i, layer in enumerate(layers):
            for module in _all_projections(layer):
                if module.bias is not None:
                    module.bias = module.bias.float().contiguous()
            norms = [layer.input_layernorm.weight.detach().float().contiguous(),
                     layer.post_attention_layernorm.weight.detach().float().contiguous()]
            self._keep.extend(norms)
            attn = layer.self_attn
            projs = list(map(_proj, _projections(layer)))
            if len(projs) == 3:  # an MoE layer: no dense gate_up/down
                projs[2:] = [_QProj(), _QProj()]
            qk_norms = [None, None]  # q/k RMSNorm weights: per head (Qwen3, [head_dim]), whole (OLMoE), or none
            if attn.q_norm is not None:
                qk_norms = [n.weight.detach().float().contiguous() for n in (attn.q_norm, attn.k_norm)]
                self._keep.extend(qk_norms)
            whole = int(qk_norms[0] is not None and qk_norms[0].numel() != attn.head_dim)
            clip = float(getattr(attn, "clip_qkv", None) or 0.0)
            self.layers[i] = _QLayer(*projs, norms[0].data_ptr(), norms[1].data_ptr(),
                                     attn.k_cache.data_ptr(), attn.v_cache.data_ptr(),
                                     None if attn.k_scale is None else attn.k_scale.data_ptr(),
                                     None if attn.v_scale is None else attn.v_scale.data_ptr(), self.moe.pointer(i),
                                     *(None if n is None else n.data_ptr() for n in qk_norms), whole, clip)
        a = layers[0].self_attn
        self.dims = _QModelDims(model.config.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim,
                                model.config.intermediate_size, a.k_cache.shape[1], 0,
                                layers[0].input_layernorm.eps, a.scale, _KV_DTYPES[a.k_cache.dtype], 1)
        self._fn = kernels.decode_layers_fn
        self._inputs_fn = kernels.layer_attention_inputs_fn
        self._outputs_fn = kernels.layer_attention_outputs_fn
        # The C halves multiply quantised weights with fuselm_qlinear at every row count; for long
        # chunks the torch layer's dequantise-then-GEMM is faster (fuselm/quant/linear.py), so
        # quantised models take the halves only for steps below the lowest crossover of their parts
        # (QuantLinear.gemm_rows: the rows', or a tiled part's, which with VNNI has none).
        from fuselm.kernels.dense_linear import DenseLinear

        limits = [rows for layer in layers for m in _all_projections(layer) if not isinstance(m, DenseLinear)
                  for rows in m.gemm_rows if rows is not None]  # QuantLinear's crossover of each part
        self.max_prompt_step_tokens = min(limits) - 1 if limits else None

    @staticmethod
    def unsupported_reason(model) -> str | None:
        """Why the C layers cannot run this model (None when they can): they need every projection
        quantised (at most three parts) or a DenseLinear on CPU, float32 activations, and a
        float32, bf16 or int8 KV cache."""
        from fuselm.kernels.dense_linear import DenseLinear
        from fuselm.quant.linear import QuantLinear

        if not getattr(model, "supports_c_layers", False):
            return f"{type(model).__name__}'s layers have blocks the C layers do not implement"
        eps = model.layers[0].input_layernorm.eps
        if any(layer.self_attn.q_norm is not None and (layer.self_attn.q_norm.eps != eps or layer.self_attn.k_norm.eps
                                                       != eps) for layer in model.layers):
            return "the q/k norms' epsilon differs from the layer norms', and the C layers take one"
        windowed = sum(1 for layer in model.layers if layer.self_attn.sliding_window)
        if windowed:
            return f"{windowed} of {len(model.layers)} layers have a sliding window, which the C layers do not take"
        if model.norm.weight.dtype != torch.float32:
            return f"activations are {str(model.norm.weight.dtype).removeprefix('torch.')}, the C layers run float32"
        for layer in model.layers:
            if isinstance(layer.mlp, MoEBlock) and (why := _moe_unsupported_reason(layer.mlp)) is not None:
                return f"an MoE layer: {why}"
            attn = layer.self_attn
            if attn.k_cache is None or attn.k_cache.dtype not in _KV_DTYPES:
                return "the KV cache's dtype is one the C layers do not read"
            for module in _all_projections(layer):
                if isinstance(module, DenseLinear):
                    continue
                if not isinstance(module, QuantLinear) or module.kernels is None:
                    return f"a projection uses {module.kind}, which the C layers cannot read"
                if len(module.parts) > _MAX_PARTS:
                    return f"a projection has {len(module.parts)} quantised formats (at most {_MAX_PARTS})"
        return None

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_table: torch.Tensor,
            ctx_lens: torch.Tensor, num_single: int | None = None, shared: torch.Tensor | None = None) -> None:
        """x [M, hidden] float32, updated in place; cos/sin [M, head_dim]; block_table [M, B] int64.
        Rows from num_single on (default: none) are query rows of sequences with several of them.
        `shared`: the step's shared-prefix groups encoded for the C kernel (layers/cascade.py), or None."""
        assert x.is_contiguous() and x.dtype == torch.float32 and block_table.is_contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        self.dims.max_blocks = block_table.shape[1]
        self.dims.num_threads = torch.get_num_threads()
        self.moe.prepare(x.shape[0])
        self._fn(ctypes.addressof(self.layers), len(self.layers), ctypes.addressof(self.dims), x.data_ptr(), x.shape[0],
                 x.shape[0] if num_single is None else num_single, cos.data_ptr(),
                 sin.data_ptr(), block_table.data_ptr(), ctx_lens.data_ptr(), None if shared is None else shared.data_ptr())
        self.moe.record(x.shape[0])

    def takes_prompt_step(self, num_tokens: int) -> bool:
        """Whether a step of num_tokens tokens with prompt chunks runs its layers in C halves."""
        return self.max_prompt_step_tokens is None or num_tokens <= self.max_prompt_step_tokens

    def attention_inputs(self, layer: int, x: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RMSNorm, q/k/v projection and rotary of layer `layer` for x [T, hidden] (float32, contiguous):
        q [T, Hq, D], k and v [T, Hkv, D]. cos/sin [T, head_dim] contiguous."""
        t = x.shape[0]
        d = self.dims
        q = torch.empty((t, d.num_heads, d.head_dim), dtype=torch.float32)
        k = torch.empty((t, d.num_kv_heads, d.head_dim), dtype=torch.float32)
        v = torch.empty((t, d.num_kv_heads, d.head_dim), dtype=torch.float32)
        d.num_threads = torch.get_num_threads()
        self._inputs_fn(ctypes.addressof(self.layers), layer, ctypes.addressof(d), x.data_ptr(), t, cos.data_ptr(),
                        sin.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr())
        return q, k, v

    def attention_outputs(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> None:
        """x += o_proj(attn), then x += MLP(RMSNorm(x)), in place; attn [T, Hq, D] contiguous."""
        assert attn.is_contiguous() and attn.dtype == torch.float32
        self.dims.num_threads = torch.get_num_threads()
        self.moe.prepare(x.shape[0])
        self._outputs_fn(ctypes.addressof(self.layers), layer, ctypes.addressof(self.dims), x.data_ptr(),
                         attn.data_ptr(), x.shape[0])
        self.moe.record(x.shape[0], layer)
