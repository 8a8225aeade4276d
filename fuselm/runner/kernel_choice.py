"""Kernel choice by measurement: which linear method each projection role takes, and whether the
layers run as C calls, decided by timing the candidates on the machine that runs them.

Fixed rules tuned on one CPU lose on others: fuselm's fp32 GEMM beats oneDNN by 1.2-2.8x at
decode sizes on an AVX2 EPYC, while on CPUs where oneDNN has AVX-512 or AMX kernels the order can
change, and where the C layer step pays depends on how slow the eager path is there. So at engine
start, on CPU with the C kernels, the execution plan (execution_plan.py) asks this module:

- per projection role (qkv, o, gate_up, down, lm_head) of a float weight, every method that
  applies (`fuselm-fp32-gemm`, `onednn` / `onednn+c1row`, `torch` F.linear) is timed on the
  role's first weight at the row counts the scheduler produces: 1 row, a decode batch
  (max_num_seqs, at most the token budget) and a prompt chunk (max_num_batched_tokens, timed at
  up to PREFILL_ROWS_CAP rows); the LM head only at 1 row and the decode batch (only sampling rows
  reach it). Rounds interleave the candidates and keep each one's best time, so a noisy
  neighbour slows every candidate alike. A role takes the candidate with the smallest sum, over
  row counts, of its time relative to the fastest there; the rules' choice keeps the role unless
  another beats it by MARGIN. Where the C layers can run (a float32 Llama-family model), q/k/v, o,
  gate/up and down keep fuselm's layout untimed: it is the only one the C layers read, and what
  they save (the eager layer's ~25 ops) is timed by the next point instead;
- the C layer step against the per-layer torch path, by timing whole synthetic steps through the
  runner (`choose_layer_step`): a decode step of the decode batch (up to 64 rows), and a
  prompt-chunk step (up to 128 tokens);
- prompt chunks' attention: fuselm's C chunk kernel (kernels/chunk_attention.c) against torch's SDPA
  (`choose_chunk_attention`), on one layer's cache, for a chunk of up to CHUNK_TIMING_CAP tokens after no
  cached positions and after as many (a later chunk of a long prompt);
- before those, the rows of x that fuselm's fp32 GEMM register tiles take (`choose_tile_rows`: 12 or 8
  with AVX-512), timed on a weight of the model's gate/up shape at the decode batch and a prompt chunk.
  Tile shapes never change results; on a Zen 4 EPYC tiles of 8 rows ran 2-9% faster than the 12 the
  tiles were written for.

On a busy machine (machine_busy) timings would measure the neighbours, so nothing is timed and
the rules decide; each row count's rounds are cut to a time budget, so a first start stays short.

One method per role (not per row count) keeps one copy of each weight. Results are cached in
~/.cache/fuselm/kernel_choice/ under a hash of everything they depend on (CPU model, the kernels'
ISA variant and build key, torch version, thread count, dtype, shapes, row counts, candidates), so
a later start reads them instead of timing. FUSELM_KERNEL_CHOICE overrides: `rules` takes the fixed
rules with no timing; `role=kind,...` (roles qkv, o, gate_up, down, lm_head, `layers` = c or
torch, `chunks` = c or torch, and `tile_rows` = a row count) forces those choices and takes the rules
for the rest, also without timing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger("fuselm")

CHOICE_ENV = "FUSELM_KERNEL_CHOICE"
ROLES = ("qkv", "o", "gate_up", "down", "lm_head")
# The projections the C layers read (an MoE layer's router and shared expert too): where the C layer step can run
# they keep fuselm's layout untimed, and the step itself is timed; a faster torch router alone would cost the step.
LAYER_ROLES = (*ROLES[:4], "router", "shared_gate_up", "shared_down", "shared_gate")
LAYER_STEP_KINDS = ("c", "torch")
PREFILL_ROWS_CAP = 256  # per-row cost is flat beyond a few hundred rows; larger chunks would only slow start-up
LAYER_STEP_ROWS_CAP = 64  # whole synthetic steps cost tens of ms: decode steps of up to 64 rows, chunks of up to 128
LAYER_STEP_CHUNK_CAP = 128
ROUNDS = 3  # interleaved rounds per row count (after one warm-up call each); the best time counts
ROUND_BUDGET_S = 1.0  # rounds are cut where they would take longer per row count
MARGIN = 0.05  # another method replaces the rules' choice only when at least this much faster
TILE_ROWS_MARGIN = 0.02  # a tile shape costs nothing to switch (no second copy of a weight): a smaller margin
CHUNK_TIMING_CAP = 256  # prompt-chunk tokens the chunk attention is timed at (the token budget, at most this)
TILE_ROWS_CANDIDATES = (12, 8)  # the AVX-512 tiles' rows as written, and the shape that measured faster on Zen 4
SCHEMA = 1  # bump when what is measured or how it is scored changes: old cache entries are then ignored


@dataclass
class Override:
    """FUSELM_KERNEL_CHOICE, parsed: `rules` (no timing), forced kinds per role (and for `layers`), or
    None (measure)."""

    forced: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def from_env() -> "Override | None":
        text = os.environ.get(CHOICE_ENV, "").strip()
        if text in ("", "measure"):
            return None
        if text == "rules":
            return Override()
        forced = {}
        for item in text.split(","):
            role, sep, kind = item.strip().partition("=")
            if not sep or role not in (*ROLES, "layers", "chunks", "tile_rows") or not kind:
                raise ValueError(f"{CHOICE_ENV}={text!r}: expected 'measure', 'rules' or role=kind pairs "
                                 f"(roles {', '.join(ROLES)}, layers, chunks, tile_rows), e.g. qkv=onednn,layers=torch")
            if role in ("layers", "chunks") and kind not in LAYER_STEP_KINDS:
                raise ValueError(f"{CHOICE_ENV}: {role}={kind!r}; choose one of {', '.join(LAYER_STEP_KINDS)}")
            if role == "tile_rows" and not (kind.isdigit() and int(kind) >= 1):
                raise ValueError(f"{CHOICE_ENV}: tile_rows={kind!r}; give a row count, e.g. tile_rows=8")
            forced[role] = kind
        return Override(forced)


@dataclass
class Timings:
    """One measured choice: seconds per candidate at each row count, and the winner."""

    rows: tuple[int, ...]
    seconds: dict[str, list[float]]
    chosen: str
    cache_hit: bool = False
    spent: float = 0.0  # seconds the measurement took (0 from the cache)
    busy: bool = False  # measured on a busy machine: shown, not trusted, not stored
    unit: str = "rows"  # what `rows` counts, for the plan line

    def describe(self) -> str:
        if not self.seconds:
            return f"not timed (machine busy), {self.chosen}"
        ranked = sorted(self.seconds, key=lambda kind: _score(self.seconds, kind))
        return " < ".join(f"{kind} {'/'.join(_fmt(s) for s in self.seconds[kind])}" for kind in ranked)


def _fmt(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.0f}us" if us < 10_000 else f"{us / 1000:.1f}ms"


def _score(seconds: dict[str, list[float]], kind: str) -> float:
    best = [min(times[i] for times in seconds.values()) for i in range(len(seconds[kind]))]
    return sum(t / b for t, b in zip(seconds[kind], best))


def pick(seconds: dict[str, list[float]], default: str, margin: float = MARGIN) -> str:
    """The candidate with the smallest sum of time relative to the fastest at each row count; the
    default keeps its place unless another scores at least `margin` lower."""
    if not seconds:
        return default
    best = min(seconds, key=lambda kind: _score(seconds, kind))
    if default in seconds and _score(seconds, best) >= _score(seconds, default) * (1 - margin):
        return default
    return best


def row_counts(role: str, max_num_seqs: int, max_num_batched_tokens: int) -> tuple[int, ...]:
    """The row counts a role's projection sees: 1, a decode batch, a prompt chunk (not for the LM head)."""
    decode = min(max_num_seqs, max_num_batched_tokens)
    counts = {1, decode}
    if role != "lm_head":
        counts.add(min(max_num_batched_tokens, PREFILL_ROWS_CAP))
    return tuple(sorted(counts))


def environment_key(kernels, threads: int | None = None) -> dict:
    """What every measurement depends on besides its shapes."""
    from fuselm.kernels.build import cpu_model_name

    return {"schema": SCHEMA, "cpu": cpu_model_name(), "isa": getattr(kernels, "isa", None),
            "build": getattr(kernels, "build_key", None), "torch": torch.__version__,
            "threads": threads or torch.get_num_threads()}


def cache_path(key: dict) -> Path:
    root = os.environ.get("FUSELM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fuselm")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(root) / "kernel_choice" / f"{digest}.json"


def machine_busy() -> bool:
    """Whether other work competes for the cores: the 1-minute load average (which counts this
    process too) above 1.5 x the CPUs. Timings taken then measure the contention (a multi-threaded
    kernel waits a scheduler slice for its descheduled thread), not the kernels."""
    try:
        return os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1)
    except OSError:
        return False


def cached_timings(key: dict, measure: Callable[[], dict[str, list[float]]], rows: tuple[int, ...],
                   default: str, margin: float = MARGIN) -> Timings:
    """The timings stored under `key`, else measured now and stored; the choice is made from them.
    Timings taken on a busy machine are shown but neither trusted (the default is kept) nor stored."""
    path = cache_path(key)
    try:
        record = json.loads(path.read_text())
        if record.get("key") == key:
            return Timings(rows, record["seconds"], pick(record["seconds"], default, margin), cache_hit=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if machine_busy():  # timings now would measure the neighbours: not worth the start-up time
        return Timings(rows, {}, default, busy=True)
    start = time.perf_counter()
    seconds = measure()
    spent = time.perf_counter() - start
    if machine_busy():
        return Timings(rows, seconds, default, spent=spent, busy=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "seconds": seconds}, indent=1))
        os.replace(tmp, path)  # atomic: engines starting together never read half a record
    except OSError as exc:
        logger.warning("could not store the kernel choice in %s: %s", path, exc)
    return Timings(rows, seconds, pick(seconds, default, margin), spent=spent)


def time_interleaved(calls: dict[str, Callable[[], object]], rounds: int = ROUNDS,
                     budget_s: float = ROUND_BUDGET_S) -> dict[str, float]:
    """Each call's best wall time over `rounds` rounds that run every call once, after a warm-up
    call (which counts too); fewer rounds where the warm-up calls say they would take over
    budget_s, none when the warm-up alone did."""
    best = {}
    for kind, fn in calls.items():
        start = time.perf_counter()
        fn()
        best[kind] = time.perf_counter() - start
    per_round = sum(best.values())
    for _ in range(min(rounds, int(budget_s / max(per_round, 1e-9)))):
        for kind, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[kind] = min(best[kind], time.perf_counter() - start)
    return best


@torch.inference_mode()
def measure_linear(candidates: dict[str, Callable[[], torch.nn.Module]], in_features: int, dtype: torch.dtype,
                   rows: tuple[int, ...]) -> dict[str, list[float]]:
    """Seconds per call of each candidate method at each row count, on random activations."""
    methods = {kind: build() for kind, build in candidates.items()}
    seconds: dict[str, list[float]] = {kind: [] for kind in methods}
    g = torch.Generator().manual_seed(0)
    for m in rows:
        x = torch.randn(m, in_features, generator=g).to(dtype)
        best = time_interleaved({kind: (lambda method=method: method(x)) for kind, method in methods.items()})
        for kind, s in best.items():
            seconds[kind].append(s)
    return seconds


def choose_linear_kinds(roles: dict[str, tuple[torch.Tensor, dict[str, Callable]]], kernels, override: Override | None,
                        max_num_seqs: int, max_num_batched_tokens: int,
                        pinned: frozenset[str] = frozenset()) -> tuple[dict[str, str], dict[str, Timings]]:
    """The method kind per role from its candidates (the first is the rules' choice): forced, the
    rules' (for `pinned` roles, untimed), or measured. `roles`: role -> (its first weight,
    candidate kind -> builder)."""
    chosen: dict[str, str] = {}
    timings: dict[str, Timings] = {}
    env = environment_key(kernels)
    for role, (weight, candidates) in roles.items():
        default = next(iter(candidates))
        if override is not None:
            kind = override.forced.get(role, default)
            if kind not in candidates:
                raise ValueError(f"{CHOICE_ENV}: {role}={kind} does not apply to this {role} weight "
                                 f"({str(weight.dtype).removeprefix('torch.')}); choose one of {', '.join(candidates)}")
            chosen[role] = kind
            continue
        if len(candidates) == 1 or role in pinned:
            chosen[role] = default
            continue
        rows = row_counts(role, max_num_seqs, max_num_batched_tokens)
        key = {**env, "what": "linear", "role": role, "shape": list(weight.shape), "dtype": str(weight.dtype),
               "rows": list(rows), "candidates": list(candidates)}
        t = cached_timings(key, lambda: measure_linear(candidates, weight.shape[1], weight.dtype, rows), rows, default)
        timings[role] = t
        chosen[role] = t.chosen
    return chosen, timings


@torch.inference_mode()
def measure_tile_rows(kernels, out_features: int, in_features: int, rows: tuple[int, ...],
                      candidates: tuple[int, ...]) -> dict[str, list[float]]:
    """Seconds of fuselm's fp32 GEMM on a random packed weight [out_features, in_features] at each row count,
    with each candidate tile height; the setting is left at the first candidate."""
    g = torch.Generator().manual_seed(0)
    packed = kernels.dense_pack(torch.randn(out_features, in_features, generator=g))
    seconds: dict[str, list[float]] = {str(c): [] for c in candidates}

    def call(tile_rows, x):
        kernels.set_dense_tile_rows(tile_rows)
        kernels.dense_linear(x, packed, None, out_features)

    try:
        for m in rows:
            x = torch.randn(m, in_features, generator=g)
            best = time_interleaved({str(c): (lambda c=c: call(c, x)) for c in candidates})
            for kind, s in best.items():
                seconds[kind].append(s)
    finally:
        kernels.set_dense_tile_rows(candidates[0])
    return seconds


def choose_tile_rows(kernels, override: Override | None, out_features: int, in_features: int, max_num_seqs: int,
                     max_num_batched_tokens: int) -> Timings | None:
    """Set the rows of fuselm's fp32 GEMM register tiles for this process: forced (`tile_rows=N`), the tiles' own
    (rules), or the faster of TILE_ROWS_CANDIDATES on a weight of [out_features, in_features] (at most 4,096 x
    8,192) at the decode batch and a prompt chunk. None when nothing was timed (no AVX-512 tiles, an override)."""
    most = getattr(kernels, "dense_max_tile_rows", 0)
    if override is not None:
        forced = override.forced.get("tile_rows")
        if forced is not None and most:
            kernels.set_dense_tile_rows(min(int(forced), most))
        return None
    if most < max(TILE_ROWS_CANDIDATES):  # AVX2's tiles are 6 rows: nothing to choose
        return None
    out_features, in_features = min(out_features, 4096), min(in_features, 8192)
    rows = tuple(sorted({max(1, min(max_num_seqs, max_num_batched_tokens)),
                         min(max_num_batched_tokens, PREFILL_ROWS_CAP)}))
    candidates = TILE_ROWS_CANDIDATES
    key = {**environment_key(kernels), "what": "gemm_tile_rows", "shape": [out_features, in_features],
           "rows": list(rows), "candidates": list(candidates)}
    timings = cached_timings(key, lambda: measure_tile_rows(kernels, out_features, in_features, rows, candidates),
                             rows, str(candidates[0]), TILE_ROWS_MARGIN)
    kernels.set_dense_tile_rows(int(timings.chosen))
    return timings


def _synthetic_step(runner, tokens_per_row: list[int], context: int):
    """A SchedulerOutput of rows with `tokens_per_row` new tokens each after `context` cached ones,
    on blocks 0, 1, ... (the pool hands none out before the engine starts)."""
    from fuselm.core.scheduler_output import ScheduledRequest, SchedulerOutput
    from fuselm.sampling_params import SamplingParams

    bs = runner.block_size
    params = SamplingParams(max_tokens=1)
    rows, next_block = [], 0
    for i, n in enumerate(tokens_per_row):
        blocks = -(-(context + n) // bs)
        rows.append(ScheduledRequest(seq_id=i, request_id=str(i), num_computed_tokens=context, token_ids=(1,) * n,
                                     block_ids=tuple(range(next_block, next_block + blocks)), needs_sample=True,
                                     params=params, num_prompt_tokens=context + n))
        next_block += blocks
    return SchedulerOutput(tuple(rows), sum(tokens_per_row), ()), next_block


@torch.inference_mode()
def measure_layer_step(runner, steps: dict[str, object]) -> dict[str, list[float]]:
    """Seconds of the model's forward over each synthetic step, with the C layers and without."""
    model = runner.model
    c_layers = model.c_layers
    seconds: dict[str, list[float]] = {"c": [], "torch": []}

    def forward(out, with_c):
        model.c_layers = c_layers if with_c else None
        runner._forward(out)

    try:
        for out in steps.values():
            best = time_interleaved({"c": lambda: forward(out, True), "torch": lambda: forward(out, False)},
                                    rounds=2, budget_s=2 * ROUND_BUDGET_S)
            for kind, s in best.items():
                seconds[kind].append(s)
    finally:
        model.c_layers = c_layers
    return seconds


def choose_layer_step(runner, override: Override | None) -> Timings | None:
    """Keep or drop the plan's C layer step (runner.model.c_layers) by timing a decode step of the
    decode batch and, where the C halves take it, a prompt-chunk step, against the torch layers.
    None when nothing was measured (no C layers, or an override)."""
    model, plan, cfg = runner.model, runner.plan, runner.config
    c_layers = model.c_layers
    if c_layers is None:
        return None
    if override is not None:
        if override.forced.get("layers") == "torch":
            model.c_layers = None
            plan.layers = "torch"
            plan.reasons.append(f"torch layers: forced by {CHOICE_ENV}")
        return None
    bs = runner.block_size
    decode = max(1, min(cfg.max_num_seqs, cfg.max_num_batched_tokens, runner.num_blocks, LAYER_STEP_ROWS_CAP))
    chunk = min(cfg.max_num_batched_tokens, LAYER_STEP_CHUNK_CAP, runner.num_blocks * bs)
    steps = {"decode": _synthetic_step(runner, [1] * decode, bs - 1)}
    if chunk > 16 and c_layers.takes_prompt_step(chunk):
        steps["prefill"] = _synthetic_step(runner, [chunk], 0)
    rows = tuple(s[0].num_batched_tokens for s in steps.values())
    mc = runner.model_config
    key = {**environment_key(plan.attention_kernels), "what": "layers", "rows": list(rows),
           "block_size": bs, "kv": str(runner.kv_dtype), "linear": plan.linear,
           "dims": [mc.hidden_size, mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim,
                    mc.intermediate_size, mc.num_hidden_layers]}

    def measure():
        used = max(n for _, n in steps.values())
        for layer in model.layers:  # the synthetic steps read these blocks: zeros, not stale memory
            layer.self_attn.k_cache[:used].zero_()
            layer.self_attn.v_cache[:used].zero_()
        return measure_layer_step(runner, {name: out for name, (out, _) in steps.items()})

    timings = cached_timings(key, measure, rows, "c")
    if timings.busy:
        timings.chosen = "c"
        return timings
    decode_c, decode_torch = timings.seconds["c"][0], timings.seconds["torch"][0]
    if decode_torch < decode_c * (1 - MARGIN):
        model.c_layers = None
        plan.layers = "torch"
        timings.chosen = "torch"
    elif "prefill" in steps and timings.seconds["torch"][1] < timings.seconds["c"][1] * (1 - MARGIN):
        c_layers.max_prompt_step_tokens = 0  # decode steps in one C call, prompt chunks through torch layers
        plan.layers = "c-decode"
        timings.chosen = "c-decode"
    else:
        timings.chosen = "c"
    return timings


@torch.inference_mode()
def measure_chunk_attention(runner, shapes: tuple[tuple[int, int], ...]) -> dict[str, list[float]]:
    """Seconds of one layer's attention over a prompt chunk of n tokens after `cached` positions, for each (n,
    cached) in `shapes`, with the C chunk kernel and with torch's SDPA (paged_attention, the step's metadata as
    the runner builds it); the cached positions hold random K/V on blocks the pool has not handed out."""
    from fuselm.layers.paged_attention import forward_context, paged_attention

    attn = runner.model.layers[0].self_attn
    mc = runner.model_config
    g = torch.Generator().manual_seed(0)
    seconds: dict[str, list[float]] = {"c": [], "torch": []}
    for n, cached in shapes:
        out, used = _synthetic_step(runner, [n], cached)
        _, _, meta, _ = runner._build_batch(out)
        for cache in (attn.k_cache, attn.v_cache):
            if cache.is_floating_point():
                cache[:used].copy_(torch.randn(cache[:used].shape, generator=g))
        q = torch.randn(n, mc.num_attention_heads, mc.head_dim, generator=g).to(runner.dtype)
        k, v = (torch.randn(n, mc.num_key_value_heads, mc.head_dim, generator=g).to(runner.dtype) for _ in range(2))

        def call(chunk_kernel: bool) -> None:
            meta.chunk_kernel = chunk_kernel
            with forward_context(meta):
                paged_attention(q, k, v, attn.k_cache, attn.v_cache, attn.scale, getattr(attn, "k_scale", None),
                                getattr(attn, "v_scale", None))

        best = time_interleaved({"c": lambda: call(True), "torch": lambda: call(False)})
        for kind, t in best.items():
            seconds[kind].append(t)
    return seconds


def choose_chunk_attention(runner, override: Override | None) -> Timings | None:
    """Keep the plan's C chunk kernel for prompt chunks (runner.plan.chunks "c") or hand them to torch's SDPA, by
    timing both on a chunk of the token budget (at most CHUNK_TIMING_CAP tokens) after no cached positions and
    after as many. Sets plan.chunks; None when nothing was measured (no chunk kernel, an override)."""
    plan, cfg = runner.plan, runner.config
    if plan.chunks != "c":
        return None
    if override is not None:
        if override.forced.get("chunks") == "torch":
            plan.chunks = "torch-sdpa"
            plan.reasons.append(f"torch SDPA for prompt chunks: forced by {CHOICE_ENV}")
        return None
    bs = runner.block_size
    n = min(cfg.max_num_batched_tokens, CHUNK_TIMING_CAP, runner.num_blocks * bs // 2)
    if n <= 16:  # rows this short attend as query rows (model_runner's QUERY_ROW_MAX_TOKENS): never a chunk
        return None
    shapes = ((n, 0), (n, n))
    mc = runner.model_config
    key = {**environment_key(plan.attention_kernels), "what": "chunk_attention", "shapes": [list(s) for s in shapes],
           "block_size": bs, "kv": str(runner.kv_dtype), "dtype": str(runner.dtype),
           "dims": [mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim]}
    timings = cached_timings(key, lambda: measure_chunk_attention(runner, shapes), tuple(c for _, c in shapes), "c")
    timings.unit = f"cached positions ({n}-token chunks)"
    plan.chunks = "c" if timings.chosen == "c" else "torch-sdpa"
    return timings
