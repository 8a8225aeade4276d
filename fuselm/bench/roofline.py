"""The roofline of an engine step: what the arithmetic and the memory traffic of a step must cost at
the machine's measured peaks, to set against what the step took.

A throughput figure alone cannot say whether an engine is slow or the machine is: 150 tok/s is
excellent on a 2-vCPU guest and poor on a server. Here each step's work is counted from the model
config and the rows the scheduler gave it (a row = one sequence's new tokens after its cached
ones), and the machine's peaks are measured on the spot:

- FLOPs: 2 x tokens x weights of every linear layer (q, k, v, o, gate, up, down) per layer, the
  LM head for each row that samples, and attention (4 x heads x head_dim x positions attended,
  per new token and layer: QK^T and PV);
- bytes: every weight read once per step (at its stored width), each row's whole K/V context
  read once per layer (paged blocks: scattered reads) and its new K/V written once;
  activations are left out (kilobytes against the weights' hundreds of megabytes);
- peaks: fp32 FMA GFLOP/s with all threads (a large torch matmul and, where it loads, fuselm's
  own C GEMM; the higher counts), stream bandwidth (reading a large array) and scattered-read
  bandwidth (gathering KV-sized blocks in random order, as paged attention does).

A step's roofline time is max(FLOPs / FMA peak, weight bytes / stream bandwidth + K/V bytes /
scattered bandwidth); the fraction of the roofline achieved is roofline time / measured time.
The count is for dense Llama-family models with full attention (the embedded SmolLM2); a
mixture-of-experts config is refused rather than miscounted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One sequence's share of a step: K/V already cached, tokens computed now, whether it samples."""

    cached: int
    new: int
    samples: bool = True


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, mc) -> "ModelShape":
        hf = getattr(mc, "hf_config", None) or {}
        if any(hf.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
            raise ValueError("the roofline count covers dense models; this config has experts")
        return cls(mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers, mc.num_attention_heads,
                   mc.num_key_value_heads, mc.head_dim, mc.vocab_size)

    @property
    def layer_weights(self) -> int:
        """Weights of one layer's linear projections: q, k, v, o, gate, up, down."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return q + kv + o + mlp

    @property
    def lm_head_weights(self) -> int:
        return self.vocab * self.hidden


def step_cost(shape: ModelShape, rows: list[Row], weight_bytes: float, kv_bytes: float) -> dict:
    """FLOPs and bytes of one step (see the module docstring); weight_bytes / kv_bytes per element."""
    tokens = sum(r.new for r in rows)
    sampled = sum(r.samples for r in rows)
    gemm = 2 * tokens * shape.layers * shape.layer_weights + 2 * sampled * shape.lm_head_weights
    # token j (0-based) of a row with c cached attends to c + j + 1 positions
    attended = sum(r.new * r.cached + r.new * (r.new + 1) // 2 for r in rows)
    attention = 4 * shape.heads * shape.head_dim * attended * shape.layers
    weights = (shape.layers * shape.layer_weights + (shape.lm_head_weights if sampled else 0)) * weight_bytes
    kv_per_token = 2 * shape.kv_heads * shape.head_dim * kv_bytes * shape.layers  # K and V, every layer
    kv_read = sum(r.cached + r.new for r in rows) * kv_per_token
    kv_write = tokens * kv_per_token
    return {"tokens": tokens, "sampled_rows": sampled, "gemm_flops": gemm, "attention_flops": attention,
            "flops": gemm + attention, "weight_bytes": weights, "kv_read_bytes": kv_read, "kv_write_bytes": kv_write}


def roofline_seconds(cost: dict, peaks: dict) -> dict:
    """The time the step must take at the peaks: compute-bound, memory-bound, and the larger of the two.

    phase_serial_s is the bound of an engine that runs a step's matmuls and its attention one after
    the other, each phase at its own roofline: max(GEMM FLOPs / FMA peak, weight bytes / stream)
    + max(attention FLOPs / FMA peak, K/V reads / scattered + K/V writes / stream). In a decode
    step the matmuls are compute-bound and attention memory-bound, so the sum exceeds the roofline
    time: the gap is what only overlapping the two phases could win back.
    """
    flop_rate, stream, scattered = peaks["fma_gflops"] * 1e9, peaks["stream_gbps"] * 1e9, peaks["scattered_gbps"] * 1e9
    compute = cost["flops"] / flop_rate
    memory = (cost["weight_bytes"] + cost["kv_write_bytes"]) / stream + cost["kv_read_bytes"] / scattered
    gemm_phase = max(cost["gemm_flops"] / flop_rate, cost["weight_bytes"] / stream)
    attention_phase = max(cost["attention_flops"] / flop_rate,
                          cost["kv_read_bytes"] / scattered + cost["kv_write_bytes"] / stream)
    return {"compute_s": compute, "memory_s": memory, "roofline_s": max(compute, memory),
            "gemm_phase_s": gemm_phase, "attention_phase_s": attention_phase,
            "phase_serial_s": gemm_phase + attention_phase}


# ---- the machine's peaks --------------------------------------------------------------------------


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm: page faults, first-call set-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_fma_gflops(n: int = 2048, repeats: int = 5) -> dict:
    """fp32 GEMM GFLOP/s with every torch thread: torch.mm on n x n, and fuselm's C GEMM on 512 rows."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {"torch_mm_gflops": 2 * n ** 3 / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9}
    from fuselm.kernels.cpu import get_kernels
    from fuselm.kernels.dense_linear import DenseLinear, dense_kernels

    kernels = get_kernels()
    weight = torch.randn(n, n)
    if dense_kernels(kernels, weight) is not None:
        layer = DenseLinear(weight, None, kernels)
        x = torch.randn(512, n)
        out["fuselm_gemm_gflops"] = 2 * 512 * n * n / _best_seconds(lambda: layer(x), repeats) / 1e9
    out["fma_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    return out


def measure_stream_gbps(mib: int = 512, repeats: int = 5) -> dict:
    """Read bandwidth of a large array (a sum over it) and copy bandwidth (bytes read + written)."""
    import torch

    a = torch.ones(mib * 2 ** 20 // 4)
    b = torch.empty_like(a)
    nbytes = a.numel() * 4
    read = nbytes / _best_seconds(lambda: a.sum(), repeats) / 1e9
    copy = 2 * nbytes / _best_seconds(lambda: b.copy_(a), repeats) / 1e9
    return {"stream_read_gbps": read, "stream_copy_gbps": copy, "stream_gbps": max(read, copy)}


def measure_scattered_gbps(block_bytes: int, pool_mib: int = 512, gather_mib: int = 128, repeats: int = 5,
                           seed: int = 0) -> dict:
    """Memory traffic per second when gathering `block_bytes`-sized blocks of a large pool in random
    order (index_select into a buffer; bytes read + written, as the stream copy figure counts them)."""
    import torch

    elems = max(1, block_bytes // 4)
    pool = torch.ones(pool_mib * 2 ** 20 // block_bytes, elems)
    g = torch.Generator().manual_seed(seed)
    count = min(pool.shape[0], gather_mib * 2 ** 20 // block_bytes)
    idx = torch.randperm(pool.shape[0], generator=g)[:count]
    out = torch.empty(count, elems)
    seconds = _best_seconds(lambda: torch.index_select(pool, 0, idx, out=out), repeats)
    return {"scattered_gbps": 2 * count * elems * 4 / seconds / 1e9, "scattered_block_bytes": elems * 4}


def measure_peaks(block_bytes: int) -> dict:
    """All the peaks, each probe on buffers of its own (~1.5 GB), freed when it returns: a probe taken between
    steps (benchmarks/roofline.py --probe-every) holds no memory through the run."""
    import torch

    return {"threads": torch.get_num_threads(), **measure_fma_gflops(), **measure_stream_gbps(),
            **measure_scattered_gbps(block_bytes)}


def better_peaks(*probes: dict) -> dict:
    """Each rate the best of several probes (GFLOP/s and GB/s keys); the other keys from the first."""
    return {k: max(p[k] for p in probes) if k.endswith("_gbps") or k.endswith("_gflops") else v
            for k, v in probes[0].items()}


def peaks_around(timeline: list[dict], at: float) -> dict:
    """The peaks a step that ended `at` seconds into the run is rated against: the better of the last probe
    before it and the first one after it. `timeline`: probes in time order, each with its "at", the first
    taken before the run (at -inf) and the last after it (at +inf)."""
    for before, after in zip(timeline, timeline[1:]):
        if after["at"] >= at:
            return better_peaks(before, after)
    raise ValueError(f"no probe after {at} s: the timeline must end with the probe after the run")
