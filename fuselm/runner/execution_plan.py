"""The execution plan: which code runs for this model on this machine, chosen once at load.

Every choice that used to be spread over the model, the runner and the kernel modules is made
here, in one place, and logged in one line:

- attention: fuselm's C kernel over the paged cache (which ISA variant), or torch SDPA (portable);
- prompt chunks' attention (`chunks`): fuselm's C chunk kernel or torch SDPA, timed per machine by the runner;
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
    # prompt chunks' attention: "c" (kernels/chunk_attention.c over the paged cache) | "torch-sdpa"
    chunks: str = "torch-sdpa"
    linear: dict[str, str] = field(default_factory=dict)  # projection role -> linear method kind(s)
    layers: str = "torch"  # "c" (CLayers) | "c-decode" (CLayers for query-row steps only) | "torch"
    reasons: list[str] = field(default_factory=list)  # why a faster path was not taken
    attention_kernels: object | None = field(default=None, repr=False)  # CpuKernels for "c-paged"
    # what was timed to choose (runner/kernel_choice.py Timings): projection roles, and "layers"
    measured: dict = field(default_factory=dict)

    def summary(self) -> str:
        isa = f" [{self.kernels_isa}]" if self.kernels_isa else ""
        by_kind: dict[str, list[str]] = {}
        for role, kind in self.linear.items():
            by_kind.setdefault(kind, []).append(role)
        linears = ", ".join(f"{'/'.join(roles)}={kind}" for kind, roles in by_kind.items())
        line = (f"execution plan on {self.device}{isa}: attention={self.attention}, chunks={self.chunks}, "
                f"norm={self.norm}, layers={self.layers}, linear: {linears}")
        if self.reasons:
            line += "; why: " + "; ".join(self.reasons)
        if self.measured:
            timings = self.measured.values()
            how = ("from the cache" if all(t.cache_hit for t in timings) else
                   f"in {sum(t.spent for t in timings):.1f} s" + (
                       ", machine busy: the rules decide, nothing cached" if any(t.busy for t in timings) else ""))
            line += f"; measured (best of interleaved rounds, {how}): " + "; ".join(
                f"{name} at {'/'.join(map(str, t.rows))} {t.unit}: {t.describe()}" for name, t in self.measured.items())
        return line


def linear_candidates(module: LinearMethod, kernels, onednn: bool, role: str) -> dict[str, object]:
    """The methods that can store and multiply a float `module`'s weight on this CPU, kind -> builder,
    the fixed rules' choice first: fuselm's panel layout when its fp32 GEMM is there (faster than
    oneDNN at decode sizes on AVX2, and readable by the C layers), then oneDNN's packed layout
    (float32/bf16), then F.linear on the plain weight (the module itself)."""
    from fuselm.kernels.dense_linear import DenseLinear, dense_kernels
    from fuselm.kernels.onednn import OneDNNLinear, pack_weight, small_m_kernels

    weight = module.weight
    found: dict[str, object] = {}
    if dense_kernels(kernels, weight) is not None:
        found[DenseLinear.kind] = lambda: DenseLinear(weight, module.bias, kernels)
    packed = pack_weight(weight) if onednn else None
    if packed is not None:
        if role == "lm_head":  # always on the packed weight (no plain-weight path for large row counts)
            found["onednn"] = lambda: OneDNNLinear(weight, module.bias, packed, None, large_m_plain=False)
        else:
            small_m = small_m_kernels(weight, kernels)
            found["onednn+c1row" if small_m is not None else "onednn"] = \
                lambda: OneDNNLinear(weight, module.bias, packed, small_m)
    found[module.kind] = lambda: module
    return found


def choose_linear(module: LinearMethod, kernels, onednn: bool, role: str, kind: str | None = None) -> LinearMethod:
    """The method for `module`: `kind` (one of linear_candidates'), else the fixed rules' choice.
    Quantised weights keep their format and multiply in fuselm's C kernel when it is there."""
    from fuselm.quant.linear import QuantLinear

    if isinstance(module, QuantLinear):
        module.use_cpu_kernels(kernels)
        return module
    if not isinstance(module, TorchLinear):
        return module
    candidates = linear_candidates(module, kernels, onednn, role)
    return candidates[kind if kind is not None else next(iter(candidates))]()


def plan_execution(model, device: torch.device, use_cpu_kernels: bool, kv_dtype: torch.dtype,
                   parallel=None, max_num_seqs: int = 128, max_num_batched_tokens: int = 512) -> ExecutionPlan:
    """Choose every code path for `model` (loaded, KV caches attached) and install the choices.

    With `plan.attention == "c-paged"` the runner hands `plan.attention_kernels` to the attention layers.
    `parallel` (a fuselm.parallel.group.TensorParallelGroup): `model` is one rank's shard; the chosen
    methods of o, down and the LM head, and the embedding, are wrapped with their collectives.
    On CPU with the C kernels each float projection role's method is chosen by timing its candidates
    at the scheduler's row counts (`max_num_seqs`, `max_num_batched_tokens`; runner/kernel_choice.py)."""
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
    windowed = any(layer.self_attn.sliding_window for layer in model.layers)
    if kernels is not None:
        if windowed and kv_dtype == torch.int8:
            reasons.append("the int8 C attention kernel takes no sliding window")
        elif kernels.supports(dtype, kv_dtype, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                            model.layers[0].self_attn.k_cache.shape[1]):
            attention_kernels = kernels
        else:
            reasons.append(f"the C attention kernel does not take {str(dtype).removeprefix('torch.')} with a "
                           f"{str(kv_dtype).removeprefix('torch.')} KV cache and these head shapes")
    # prompt chunks attend in C where the chunk kernel takes the model's queries and cache (float32 or bfloat16);
    # runner/kernel_choice.py choose_chunk_attention times it against torch's SDPA once the caches exist
    chunks = "c" if attention_kernels is not None and attention_kernels.chunk_attention_supports(
        torch.empty(1, cfg.num_attention_heads, cfg.head_dim, dtype=dtype), model.layers[0].self_attn.k_cache) \
        else "torch-sdpa"
    plan = ExecutionPlan(device=str(device), kernels_isa=getattr(kernels, "isa", None) if kernels else None,
                         attention="c-paged" if attention_kernels is not None else "torch-sdpa", chunks=chunks,
                         norm="c" if attention_kernels is not None else "torch", reasons=reasons,
                         attention_kernels=attention_kernels)

    onednn = device.type == "cpu" and use_cpu_kernels and onednn_available() and dtype in (torch.float32,
                                                                                          torch.bfloat16)
    chosen_kinds = {}
    if device.type == "cpu" and use_cpu_kernels:
        c_layers_possible = (attention_kernels is not None and parallel is None and dtype == torch.float32
                             and getattr(model, "supports_c_layers", False))
        from fuselm.runner.kernel_choice import Override, choose_tile_rows

        override = Override.from_env()
        if parallel is not None or kernels is None:  # every rank must build the same methods: the rules decide
            override = override or Override()
        tile_rows = None
        if kernels is not None and dtype == torch.float32:  # first: the fp32 GEMM's timings below depend on it
            tile_rows = choose_tile_rows(kernels, override, 2 * cfg.intermediate_size, cfg.hidden_size, max_num_seqs,
                                         max_num_batched_tokens)
        chosen_kinds, plan.measured = _choose_kinds(model, kernels, onednn, override, max_num_seqs,
                                                    max_num_batched_tokens, c_layers_possible)
        if tile_rows is not None:
            plan.measured["tile_rows"] = tile_rows
    kinds: dict[str, dict[str, None]] = {}
    for parent, attr, role in model.linear_methods():
        module = getattr(parent, attr)
        if isinstance(module, GroupedExperts):  # an MoE layer's experts: one C call, or the torch path
            why = choose_experts(module, kernels, dtype)
            if kernels is not None and why is not None and f"torch experts: {why}" not in plan.reasons:
                plan.reasons.append(f"torch experts: {why}")
        elif device.type == "cpu" and use_cpu_kernels:
            module = choose_linear(module, kernels, onednn, role, chosen_kinds.get(role))
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


def _choose_kinds(model, kernels, onednn: bool, override, max_num_seqs: int, max_num_batched_tokens: int,
                  c_layers_possible: bool):
    """Per role of float projections: the kind to build (forced by `override`, measured, or the rules') and the
    timings. Where the C layers can run, the layer roles keep fuselm's layout (the one they read)."""
    from fuselm.kernels.dense_linear import DenseLinear
    from fuselm.runner.kernel_choice import LAYER_ROLES, choose_linear_kinds

    roles = {}
    for parent, attr, role in model.linear_methods():
        module = getattr(parent, attr)
        if type(module) is TorchLinear and role not in roles:
            roles[role] = (module.weight, linear_candidates(module, kernels, onednn, role))
    pinned = frozenset()
    if c_layers_possible and all(next(iter(roles[r][1])) == DenseLinear.kind for r in LAYER_ROLES if r in roles):
        pinned = frozenset(LAYER_ROLES)
    return choose_linear_kinds(roles, kernels, override, max_num_seqs, max_num_batched_tokens, pinned)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor that holds weights: parameters, and what each linear method
    and quantised embedding holds (a tied LM head sharing the embedding table counts once)."""
    from fuselm.quant.linear import QuantEmbedding

    tensors = list(model.parameters())
    for module in model.modules():
        if isinstance(module, LinearMethod):
            tensors.extend(module.weight_tensors())
        elif isinstance(module, QuantEmbedding):
            tensors.extend(module.weight_tensors())
    # oneDNN's packed weights are opaque tensors without a storage: distinct by identity
    distinct = {(t.data_ptr() if t.layout == torch.strided else id(t)): t.numel() * t.element_size() for t in tensors}
    return sum(distinct.values())
