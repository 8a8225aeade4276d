"""The execution plan: which code runs for this model on this machine, chosen once at load.

Every choice that used to be spread over the model, the runner and the kernel modules is made
here, in one place, and logged in one line:

- attention: fuselm's C kernel over the paged cache (which ISA variant), or torch SDPA (portable);
- RMSNorm: one C pass per row, or torch ops;
- the linear method of each projection kind (qkv, o, gate_up, down, lm_head; see fuselm/layers/linear.py);
- how each MoE layer's experts run (role `experts`: one C call per layer, kernels/moe.c, or torch;
  fuselm/layers/moe.py);
- whether the layers' math runs as C calls (kernels/c_layers.py `CLayers`: one call per step
  of query rows, two per layer for steps with prompt chunks) or as torch ops per layer;
- and why, wherever a faster path was not taken.

`plan_execution` decides and installs (it replaces the model's TorchLinear slots by the chosen
methods), `ExecutionPlan.summary()` is the start-up line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fuselm.layers.linear import LinearMethod, TorchLinear
from fuselm.layers.moe import GroupedExperts, choose_experts


@dataclass
class ExecutionPlan:
    device: str
    kernels_isa: str | None  # the C kernels' ISA variant, None when no C kernels are loaded
    attention: str  # "c-paged" | "torch-sdpa"
    norm: str  # "c" | "torch"
    linear: dict[str, str] = field(default_factory=dict)  # projection role -> linear method kind(s)
    layers: str = "torch"  # "c" (CLayers) | "torch"
    reasons: list[str] = field(default_factory=list)  # why a faster path was not taken
    attention_kernels: object | None = field(default=None, repr=False)  # CpuKernels for "c-paged"

    def summary(self) -> str:
        isa = f" [{self.kernels_isa}]" if self.kernels_isa else ""
        by_kind: dict[str, list[str]] = {}
        for role, kind in self.linear.items():
            by_kind.setdefault(kind, []).append(role)
        linears = ", ".join(f"{'/'.join(roles)}={kind}" for kind, roles in by_kind.items())
        line = (f"execution plan on {self.device}{isa}: attention={self.attention}, norm={self.norm}, "
                f"layers={self.layers}, linear: {linears}")
        if self.reasons:
            line += "; why: " + "; ".join(self.reasons)
        return line


def choose_linear(module: LinearMethod, kernels, onednn: bool, role: str) -> LinearMethod:
    """The method that stores and multiplies `module`'s weight best on this CPU.

    Quantised weights keep their format and multiply in fuselm's C kernel when it is there. Float32
    weights go into fuselm's panel layout when its AVX2 GEMM is there (faster than oneDNN at decode
    sizes, and readable by the C layers); otherwise float32/bf16 into oneDNN's packed layout.
    """
    from fuselm.kernels.dense_linear import DenseLinear, dense_kernels
    from fuselm.kernels.onednn import OneDNNLinear, pack_weight, small_m_kernels
    from fuselm.quant.linear import QuantLinear

    if isinstance(module, QuantLinear):
        module.use_cpu_kernels(kernels)
        return module
    if not isinstance(module, TorchLinear):
        return module
    weight = module.weight
    if dense_kernels(kernels, weight) is not None:
        return DenseLinear(weight, module.bias, kernels)
    packed = pack_weight(weight) if onednn else None
    if packed is None:
        return module
    if role == "lm_head":  # always on the packed weight (no plain-weight path for large row counts)
        return OneDNNLinear(weight, module.bias, packed, None, large_m_plain=False)
    return OneDNNLinear(weight, module.bias, packed, small_m_kernels(weight, kernels))


def plan_execution(model, device: torch.device, use_cpu_kernels: bool, kv_dtype: torch.dtype,
                   parallel=None) -> ExecutionPlan:
    """Choose every code path for `model` (loaded, KV caches attached) and install the choices.

    With `plan.attention == "c-paged"` the runner hands `plan.attention_kernels` to the attention layers.
    `parallel` (a fuselm.parallel.group.TensorParallelGroup): `model` is one rank's shard; the chosen
    methods of o, down and the LM head, and the embedding, are wrapped with their collectives."""
    from fuselm.kernels.onednn import onednn_available

    cfg = model.config
    dtype = model.norm.weight.dtype
    kernels = None
    reasons: list[str] = []
    if device.type != "cpu":
        reasons.append(f"{device.type}: portable torch path")
    elif not use_cpu_kernels:
        reasons.append("cpu_kernels is off")
    else:
        from fuselm.kernels.cpu import get_kernels

        kernels = get_kernels()
        if kernels is None:
            reasons.append("the C kernels could not be built or loaded (see the warning above)")
    attention_kernels = None
    if kernels is not None:
        if kernels.supports(dtype, kv_dtype, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                            model.layers[0].self_attn.k_cache.shape[1]):
            attention_kernels = kernels
        else:
            reasons.append("the C attention kernel does not read an int8 KV cache" if kv_dtype == torch.int8 else
                           f"the C attention kernel does not take {str(dtype).removeprefix('torch.')} with a "
                           f"{str(kv_dtype).removeprefix('torch.')} KV cache and these head shapes")
    plan = ExecutionPlan(device=str(device), kernels_isa=getattr(kernels, "isa", None) if kernels else None,
                         attention="c-paged" if attention_kernels is not None else "torch-sdpa",
                         norm="c" if attention_kernels is not None else "torch", reasons=reasons,
                         attention_kernels=attention_kernels)

    onednn = device.type == "cpu" and use_cpu_kernels and onednn_available() and dtype in (torch.float32,
                                                                                          torch.bfloat16)
    kinds: dict[str, dict[str, None]] = {}
    for parent, attr, role in model.linear_methods():
        module = getattr(parent, attr)
        if isinstance(module, GroupedExperts):  # an MoE layer's experts: one C call, or the torch path
            why = choose_experts(module, kernels, dtype)
            if kernels is not None and why is not None and f"torch experts: {why}" not in plan.reasons:
                plan.reasons.append(f"torch experts: {why}")
        elif device.type == "cpu" and use_cpu_kernels:
            module = choose_linear(module, kernels, onednn, role)
        if parallel is not None:
            from fuselm.parallel.layers import wrap_linear

            module = wrap_linear(module, role, parallel)
        setattr(parent, attr, module)
        kinds.setdefault(role, {})[module.kind] = None
    plan.linear = {role: "|".join(k) for role, k in kinds.items()}
    if parallel is not None:
        from fuselm.parallel.layers import wrap_embedding

        from fuselm.parallel.expert_parallel import install_expert_parallel

        wrap_embedding(model, parallel)
        plan.reasons.append(f"tensor parallel over {parallel.world_size} ranks (this is rank {parallel.rank})")
        if install_expert_parallel(model, parallel):
            plan.reasons.append("expert parallel: this rank holds whole experts, one all-reduce per MoE layer")

    if attention_kernels is not None:
        from fuselm.layers.norm import RMSNorm

        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.cpu_kernels = attention_kernels
        from fuselm.kernels.c_layers import CLayers

        why_not = CLayers.unsupported_reason(model) if parallel is None else \
            "tensor parallelism (the C layers do not all-reduce after o and down)"
        if why_not is None:
            model.c_layers = CLayers(model, kernels)
            plan.layers = "c"
        else:
            plan.reasons.append(f"torch layers: {why_not}")
    return plan


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor that holds weights: parameters, and what each linear method
    and quantised embedding holds (a tied LM head sharing the embedding table counts once)."""
    from fuselm.quant.linear import QuantEmbedding

    tensors = list(model.parameters())
    for module in model.modules():
        if isinstance(module, LinearMethod):
            tensors.extend(module.weight_tensors())
        elif isinstance(module, QuantEmbedding):
            q = module.qweight
            tensors.extend(t for t in (q.qweight, q.scales, q.mins) if t is not None)
    # oneDNN's packed weights are opaque tensors without a storage: distinct by identity
    distinct = {(t.data_ptr() if t.layout == torch.strided else id(t)): t.numel() * t.element_size() for t in tensors}
    return sum(distinct.values())
