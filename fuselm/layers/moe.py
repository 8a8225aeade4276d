"""The Mixture-of-Experts feed-forward block: a router, the experts run grouped, an optional shared expert.

`MoEBlock` replaces the gated MLP in the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE):

- the router is a linear layer [num_experts, hidden] (a LinearMethod, chosen by the execution plan
  like every projection); `route` takes the softmax of its logits in float32, the top-k, and
  renormalises the k weights when the config says so (Mixtral always, Qwen/OLMoE `norm_topk_prob`);
- `GroupedExperts` holds every expert's gate, up and down weights stacked ([E, N, K] floats, or a
  QuantWeight of E * N rows, the form GGUF's ffn_*_exps tensors come in) and computes
  sum_k weight_k * down_e(silu(gate_e(x)) * up_e(x)) for each token's k experts;
- Qwen2-MoE's shared expert is a gated MLP every token goes through, scaled by sigmoid(a [1, hidden]
  linear gate).

Under expert parallelism (fuselm/parallel/expert_parallel.py) a block holds only its rank's experts
(`local_experts`, global ids): the router still scores every expert, each rank runs its experts
for the (token, slot) pairs routed to them, adds its slice of the shared expert, and `reduce` (the
rank group's all-reduce, installed by the execution plan) sums the ranks' partial outputs. A
`recorder` (the runner's routing statistics, fuselm/runner/expert_stats.py) sees each step's ids.

How the experts run is the execution plan's choice (`choose_experts`): the portable torch path sorts
the step's (token, slot) pairs by expert and runs each active expert once over all its tokens (the
reference, and what other devices run); on CPU with fuselm's kernels the whole block's experts run in
one C call (kernels/moe.c) over float32 panels or the kept quantised formats: the same grouping, each
active expert's weights read once per step, the routing weight applied in the down projection's
epilogue, and no Python loop over experts.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.layers.linear import LinearMethod, TorchLinear
from fuselm.quant.formats import QuantWeight
from fuselm.quant.int4_rows16 import Int4Rows16
from fuselm.quant.int8_rows16 import Int8Rows16
from fuselm.quant.tiles import TILED


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights float32 [T, k], expert ids int64 [T, k]), as HF computes them."""
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k] each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@dataclass
class ExpertWeights:
    """One projection of every expert: float [E, N, K], or a QuantWeight of E * N rows (expert e's
    rows are e * N .. e * N + N - 1); on the C path int4 and int8 g32 rows become Int4Rows16 / Int8Rows16 tiles
    (the only copy: fuselm/quant/tiles.py)."""

    num_experts: int
    out_features: int  # N, per expert
    in_features: int  # K
    dense: torch.Tensor | None = None
    quant: QuantWeight | Int4Rows16 | Int8Rows16 | None = None

    @classmethod
    def from_parts(cls, value, num_experts: int, out_features: int, in_features: int) -> "ExpertWeights":
        """`value`: a float [E, N, K] tensor, a list of E float [N, K] tensors, or a QuantWeight [E * N, K]."""
        if isinstance(value, QuantWeight):
            if value.shape != (num_experts * out_features, in_features):
                raise ValueError(f"stacked experts {value.shape} do not fit {num_experts} x [{out_features}, "
                                 f"{in_features}]")
            return cls(num_experts, out_features, in_features, quant=value)
        if isinstance(value, (list, tuple)):
            value = torch.stack(list(value))
        if tuple(value.shape) != (num_experts, out_features, in_features):
            raise ValueError(f"experts {tuple(value.shape)} do not fit {num_experts} x [{out_features}, {in_features}]")
        return cls(num_experts, out_features, in_features, dense=value.contiguous())

    def expert_quant(self, e: int) -> QuantWeight:
        """Expert e's rows of the stacked QuantWeight (views, no copy)."""
        q, n = self.quant, self.out_features
        if isinstance(q, TILED):
            return q.rows(e * n, (e + 1) * n)
        part = lambda t: None if t is None else t[e * n:(e + 1) * n]  # noqa: E731
        return QuantWeight(q.bits, q.group_size, (n, self.in_features), part(q.qweight), part(q.scales),
                           part(q.mins), q.source)

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's weight [N, K] in `dtype`."""
        if self.dense is not None:
            return self.dense[e] if self.dense.dtype == dtype else self.dense[e].to(dtype)
        return self.expert_quant(e).dequantize(dtype)

    def tensors(self) -> list[torch.Tensor]:
        if self.dense is not None:
            return [self.dense]
        if isinstance(self.quant, TILED):
            return [self.quant.tiles]
        return [t for t in (self.quant.qweight, self.quant.scales, self.quant.mins) if t is not None]

    @property
    def label(self) -> str:
        if self.quant is not None:
            return f"int{self.quant.bits}g{self.quant.group_size}"
        return "float32" if self.dense is None else str(self.dense.dtype).removeprefix("torch.")  # None: packed


def _packed_experts(kernels, w: ExpertWeights) -> torch.Tensor:
    """Every expert of `w` in dense_linear.c's panels, end to end, on huge pages where the OS grants them
    (kernels/huge_pages.py: a batch-32 step streams all of them)."""
    from fuselm.kernels.huge_pages import empty_float32

    size = kernels.dense_packed_size(w.out_features, w.in_features)
    flat = empty_float32(w.num_experts * size)
    for e in range(w.num_experts):
        flat[e * size:(e + 1) * size] = kernels.dense_pack(w.dense[e])
    return flat


class GroupedExperts(LinearMethod):
    """Every expert of one MoE layer; forward(x, ids, weights) -> the weighted sum of each token's experts.

    A LinearMethod in name (hidden -> hidden, `kind` for the plan line, `weight_tensors` for memory
    accounting): the execution plan chooses how it runs (`choose_experts`)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, hidden, hidden
        self.intermediate = intermediate
        self.bias = None
        self.gate: ExpertWeights | None = None  # set by load(); plain attributes, never meta parameters
        self.up: ExpertWeights | None = None
        self.down: ExpertWeights | None = None
        self.kernels = None  # fuselm.kernels.cpu.CpuKernels when the C path runs
        self._c_parts: tuple | None = None  # (gate, up, down) abi.QPart of the C path
        self._packed: list[torch.Tensor] = []  # float32 panels the C path reads

    def load(self, gate, up, down) -> None:
        """Each of gate/up ([E, I, H]) and down ([E, H, I]) as ExpertWeights.from_parts takes it."""
        e, h, i = self.num_experts, self.in_features, self.intermediate
        self.gate = ExpertWeights.from_parts(gate, e, i, h)
        self.up = ExpertWeights.from_parts(up, e, i, h)
        self.down = ExpertWeights.from_parts(down, e, h, i)

    def quantize(self, quantize_rows) -> int:
        """Replace each float projection by `quantize_rows`([E * N, K] float) -> QuantWeight of the same
        rows (quantisation works per row or per group of a row, so each expert's rows come out as if
        quantised alone); before the execution plan packs anything. Returns how many were replaced."""
        count = 0
        for name in ("gate", "up", "down"):
            w = getattr(self, name)
            if w.dense is not None and w.dense.is_floating_point():
                flat = w.dense.detach().reshape(-1, w.in_features)  # [E * N, K]
                setattr(self, name, ExpertWeights.from_parts(quantize_rows(flat), w.num_experts, w.out_features,
                                                             w.in_features))
                count += 1
        return count

    @property
    def kind(self) -> str:
        if self.gate is None:
            return "grouped"
        labels = "+".join(dict.fromkeys(w.label for w in (self.gate, self.up, self.down)))
        return f"{'c' if self._c_parts is not None else 'torch'}-grouped-{labels}"

    def weight_tensors(self) -> list[torch.Tensor]:
        if self._c_parts is not None and self._packed:
            quant = [t for w in (self.gate, self.up, self.down) if w.quant is not None for t in w.tensors()]
            return [*self._packed, *quant]
        return [t for w in (self.gate, self.up, self.down) for t in w.tensors()]

    # ---- the C path (kernels/moe.c) ----------------------------------------------------------

    def use_cpu_kernels(self, kernels, dtype: torch.dtype) -> str | None:
        """Run on fuselm's C kernel when it can; returns why not, or None."""
        from fuselm.kernels.abi import DTYPE_CODES, QPart
        from fuselm.quant import tiles

        weights = (self.gate, self.up, self.down)
        if kernels is None or not hasattr(kernels, "moe_experts_fn"):
            return "no C MoE kernel"
        if any(t.device.type != "cpu" for w in weights for t in w.tensors()):
            return "experts not on the CPU"
        if any(w.dense is not None and (w.dense.dtype != torch.float32 or dtype != torch.float32
                                        or not kernels.has_simd_dense) for w in weights):
            return "float experts run in C only as float32 with AVX2"
        parts, packed = [], []
        for w in weights:
            if w.dense is not None:  # each expert in dense_linear.c's panels, end to end
                flat = _packed_experts(kernels, w)
                packed.append(flat)
                parts.append(QPart(flat.data_ptr(), None, None, w.out_features, w.in_features, 0, 32, 0))
                w.dense = None  # the panels are the only copy
                continue
            # kernels/int4_rows16.c's or int8_rows16.c's tiles replace the rows where this build runs them
            q = w.quant = tiles.repack(w.quant, kernels, w.out_features)
            if isinstance(q, TILED):
                parts.append(QPart(q.tiles.data_ptr(), None, None, w.out_features, w.in_features, 32, q.bits,
                                   int(DTYPE_CODES[q.scale_dtype])))
            else:
                parts.append(QPart(q.qweight.data_ptr(), q.scales.data_ptr(),
                                   None if q.mins is None else q.mins.data_ptr(), w.out_features, w.in_features,
                                   q.group_size, q.bits, int(DTYPE_CODES[q.scales.dtype])))
        self.kernels, self._c_parts, self._packed = kernels, tuple(parts), packed
        return None

    def _forward_c(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        xf = x.float().contiguous()  # [T, H]
        ids = ids.to(torch.int64).contiguous()  # [T, k]
        w = weights.float().contiguous()  # [T, k]
        out = torch.empty_like(xf)  # [T, H]
        gate, up, down = self._c_parts
        self.kernels.moe_experts_fn(xf.data_ptr(), xf.shape[0], ids.shape[1], ids.data_ptr(), w.data_ptr(),
                                    self.num_experts, ctypes.byref(gate), ctypes.byref(up), ctypes.byref(down),
                                    out.data_ptr(), 0, torch.get_num_threads())
        return out.to(x.dtype)

    # ---- the portable path (the reference) ---------------------------------------------------

    def _forward_torch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        top_k = ids.shape[1]
        flat = ids.reshape(-1)  # [T*k]
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // top_k  # [T*k] the token of each sorted assignment
        xs = x[token]  # [T*k, H]
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = xs[start:start + n]  # [n, H] every token expert e serves
            h = F.silu(F.linear(rows, self.gate.expert(e, x.dtype))) * F.linear(rows, self.up.expert(e, x.dtype))
            ys[start:start + n] = F.linear(h, self.down.expert(e, x.dtype))  # [n, H]
            start += n
        ys = (ys.float() * weights.reshape(-1)[order].float().unsqueeze(1)).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)  # [T, H]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids/weights [T, k] -> [T, H]."""
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        if self._c_parts is not None and x.device.type == "cpu":
            return self._forward_c(x, ids, weights)
        return self._forward_torch(x, ids, weights)


def choose_experts(module: GroupedExperts, kernels, dtype: torch.dtype) -> str | None:
    """The execution plan's choice for one MoE layer's experts: the C kernel when it applies (returns
    None), else the torch path (returns why)."""
    return module.use_cpu_kernels(kernels, dtype)


class SharedExpert(nn.Module):
    """A gated MLP every token goes through (Qwen2-MoE), scaled by sigmoid of a [1, hidden] gate."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = TorchLinear(hidden, 2 * intermediate)
        self.down_proj = TorchLinear(intermediate, hidden)
        self.expert_gate = TorchLinear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)  # [T, I] each
        return torch.sigmoid(self.expert_gate(x)) * self.down_proj(F.silu(gate) * up)  # [T, H]


class MoEBlock(nn.Module):
    """`local_experts`: the global ids of the experts this block holds (expert parallelism), in the
    order its GroupedExperts stores them; None: all `num_experts`."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, renormalize: bool,
                 shared_intermediate: int | None = None, local_experts: list[int] | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.local_experts = None if local_experts is None else list(local_experts)
        self.gate = TorchLinear(hidden, num_experts)  # the router, over every expert
        held = num_experts if local_experts is None else len(local_experts)
        self.experts = GroupedExperts(held, hidden, intermediate)
        self.shared_expert = SharedExpert(hidden, shared_intermediate) if shared_intermediate else None
        self.reduce = None  # expert parallelism: sums the ranks' partial outputs (the plan installs it)
        self.recorder = None  # called with each step's expert ids [T, k] (routing statistics)
        self._local_index: torch.Tensor | None = None  # [num_experts]: global id -> local index, -1 elsewhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)  # [T, k] each
        if self.recorder is not None:
            self.recorder(ids)
        if self.local_experts is None:
            y = self.experts(x, ids, weights)  # [T, H]
        else:
            y = self._held_experts(x, ids, weights)  # [T, H]: only this rank's experts' share
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        if self.reduce is not None:
            y = self.reduce(y.contiguous())
        return y

    def _held_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The (token, slot) pairs routed to the experts held here, run as T' tokens of one slot each."""
        if self._local_index is None or self._local_index.device != x.device:
            index = torch.full((self.num_experts,), -1, dtype=torch.long)
            index[torch.tensor(self.local_experts, dtype=torch.long)] = torch.arange(len(self.local_experts))
            self._local_index = index.to(x.device)
        local = self._local_index[ids]  # [T, k]
        token, slot = (local >= 0).nonzero(as_tuple=True)  # [P] each
        y = torch.zeros_like(x)  # [T, H]
        if token.numel():
            part = self.experts(x[token], local[token, slot].unsqueeze(1), weights[token, slot].unsqueeze(1))  # [P, H]
            y.index_add_(0, token, part)
        return y
