"""The float32 decode step's matmuls at many rows: this tree's C kernels against another tree's, in one process.

Offline float32 runs spend most of their time in decode steps of 32-256 rows, and those steps in the
panel GEMM (fuselm/kernels/dense_linear.c). This times, alternating the two builds round by round so
that a noisy neighbour slows both alike:

- each SmolLM2-135M projection shape (q/k/v 960 x 576, o 576 x 576, gate/up 3072 x 576, down 576 x 1536,
  the LM head 49,152 x 576) at each row count, in GFLOP/s, next to the kernel's own peak on a large GEMM
  (`peak`: 512 x 2048 x 2048); on request (`--shapes`), layers whose rows are 4 KB apart (K = 1,024 or 4,096:
  `qkv_k1024`, `gate_up_k1024`, `k4096`);
- the whole C decode step (every layer, attention over short contexts included, no LM head) of the
  embedded SmolLM2-135M in float32, through the runner's forward on a synthetic step of `rows`
  single-token rows, as the kernel choice (fuselm/runner/kernel_choice.py) times it.

The baseline is another checkout (`--baseline /path/to/tree`): its fuselm/kernels/build.py compiles
its own sources into a cache directory of its own. With one thread the figures are the calling
thread's CPU time (what a loaded machine distorts least); with more, wall time.

    python benchmarks/decode_gemm.py --baseline /work/main --threads 1 --rows 64,128,256
    python benchmarks/decode_gemm.py --baseline /work/main --threads 2 --parts shapes --rounds 31
    python benchmarks/decode_gemm.py --baseline /tmp/before --threads 2 --parts shapes --rows 16,32,128,1024 \
        --shapes qkv_k1024,gate_up_k1024,k4096,qkv
    python benchmarks/decode_gemm.py --baseline /tmp/before --threads 2 --parts shapes --cold --rows 16,32,48 \
        --shapes qkv,o,down,qkv_k1024

`--cold` times the shapes with their weights from memory (each call the next of ~300 MB of copies), as a decode
step reads them.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fuselm.kernels import abi, build
from fuselm.kernels.cpu import CpuKernels, get_kernels

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576),
          "peak": (2048, 2048),
          # rows 4 KB apart (dense_linear.c's tile_rows_at_stride): the MoE benchmark shapes' hidden 1,024
          # (q/k/v, the Qwen2-MoE-like shared expert's gate/up) and a 4,096-wide layer
          "qkv_k1024": (1536, 1024), "gate_up_k1024": (2048, 1024), "k4096": (4096, 4096)}
DEFAULT_SHAPES = ("qkv", "o", "gate_up", "down", "lm_head", "peak")
PEAK_ROWS = 512
COLD_BYTES = 300 * 2**20  # --cold: copies of a weight enough to come from memory (more than the L3)


def tree_kernels(tree: Path) -> CpuKernels:
    """The C kernels of another checkout, built by that checkout's own build.py (its sources, its list of
    them) for the variant this tree would load, into a cache directory beside this tree's."""
    spec = importlib.util.spec_from_file_location("baseline_build", tree / "fuselm" / "kernels" / "build.py")
    other = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = other  # dataclasses look their module up there
    spec.loader.exec_module(other)
    variant = other.VARIANTS[build.candidates()[0][0].name]
    built = other.build(variant, other.find_compiler(), build.cache_dir() / "baseline")
    signatures = abi.SIGNATURES  # bind the functions both builds have: one may export more than the other
    version = abi.ABI_VERSION  # and take the baseline's ABI version (an older tree lacks functions added since)
    lib = ctypes.CDLL(str(built.path))
    abi.SIGNATURES = {name: types for name, types in signatures.items() if hasattr(lib, name)}
    abi.ABI_VERSION = lib.fuselm_abi_version()
    try:
        return CpuKernels(built)
    finally:
        abi.SIGNATURES, abi.ABI_VERSION = signatures, version


def clock(threads: int):
    return time.thread_time if threads == 1 else time.perf_counter


def time_pair(fa, fb, rounds: int, now) -> tuple[list[float], list[float]]:
    """Seconds of each call over `rounds` rounds, the order alternating, after one warm-up call each."""
    fa(), fb()
    ta, tb = [], []
    for i in range(rounds):
        for fn, out in ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta)):
            start = now()
            fn()
            out.append(now() - start)
    return ta, tb


def summary(seconds: list[float], flops: float) -> dict:
    return {"median_ms": statistics.median(seconds) * 1e3, "best_ms": min(seconds) * 1e3,
            "gflops_median": flops / statistics.median(seconds) / 1e9, "gflops_best": flops / min(seconds) / 1e9}


def run_shapes(ka, kb, names: list[str], rows: list[int], rounds: int, now, cold: bool = False) -> list[dict]:
    """cold: each timed call reads the next of enough copies of the weight (COLD_BYTES in all) that it comes from
    memory, as in a decode step, where every layer's weight does; a timed figure is then a pass over the copies."""
    g = torch.Generator().manual_seed(0)
    results = []
    for name in names:
        n, k = SHAPES[name]
        w = torch.randn(n, k, generator=g) * 0.05
        copies = max(2, COLD_BYTES // (n * k * 4)) if cold else 1
        pa, pb = [ka.dense_pack(w) for _ in range(copies)], [kb.dense_pack(w) for _ in range(copies)]
        for m in [PEAK_ROWS] if name == "peak" else rows:
            x = torch.randn(m, k, generator=g)

            def over(kernels, packed):  # one call per copy, in turn; the figure is per call
                return lambda: [kernels.dense_linear(x, p, None, n) for p in packed]

            ta, tb = time_pair(over(ka, pa), over(kb, pb), max(3, rounds // 4) if name in ("peak", "lm_head") else rounds,
                               now)
            ta, tb = [t / copies for t in ta], [t / copies for t in tb]
            flops = 2.0 * m * n * k
            a, b = summary(ta, flops), summary(tb, flops)
            results.append({"shape": name, "n": n, "k": k, "rows": m, "cold": cold, "baseline": a, "this": b})
            print(f"{name:8s} {m:4d} rows: {a['gflops_median']:6.1f} -> {b['gflops_median']:6.1f} GFLOP/s median "
                  f"(best {a['gflops_best']:6.1f} -> {b['gflops_best']:6.1f}); "
                  f"{a['median_ms'] / b['median_ms']:.3f}x", flush=True)
    return results


def run_steps(ka, kb, rows: list[int], context: int, rounds: int, threads: int, now) -> list[dict]:
    from fuselm import LLM
    from fuselm.kernels.dense_linear import DenseLinear
    from fuselm.runner.kernel_choice import CHOICE_ENV, _synthetic_step

    os.environ.setdefault(CHOICE_ENV, "rules")  # the rules' plan (fuselm's GEMM, the C layers), nothing timed
    llm = LLM(dtype="float32", num_threads=threads, quantization="none", max_num_seqs=max(rows),
              max_num_batched_tokens=max(512, max(rows)))
    torch.set_num_threads(threads)
    runner = llm.engine.runner
    model = runner.model
    c_layers = model.c_layers
    if c_layers is None:
        raise SystemExit("the execution plan did not take the C layer step: nothing to compare")
    dense = [m for m in model.modules() if isinstance(m, DenseLinear)]
    per_token = sum(2.0 * m.in_features * m.out_features for layer in model.layers for m in layer.modules()
                    if isinstance(m, DenseLinear))

    def use(kernels):
        c_layers._fn = kernels.decode_layers_fn
        for m in dense:
            m.kernels = kernels

    def step(kernels, out):
        use(kernels)
        with torch.inference_mode():
            runner._forward(out)

    results = []
    for m in rows:
        out, used = _synthetic_step(runner, [1] * m, context)
        for layer in model.layers:  # the synthetic step reads these blocks: zeros, not stale memory
            layer.self_attn.k_cache[:used].zero_()
            layer.self_attn.v_cache[:used].zero_()
        ta, tb = time_pair(lambda: step(ka, out), lambda: step(kb, out), rounds, now)
        a, b = summary(ta, per_token * m), summary(tb, per_token * m)
        results.append({"shape": "decode_step", "rows": m, "context": context, "baseline": a, "this": b})
        print(f"C decode step {m:4d} rows: {a['median_ms']:7.2f} -> {b['median_ms']:7.2f} ms median "
              f"({a['gflops_median']:5.1f} -> {b['gflops_median']:5.1f} GFLOP/s in the projections; "
              f"best {a['best_ms']:7.2f} -> {b['best_ms']:7.2f}); {a['median_ms'] / b['median_ms']:.3f}x", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="another checkout of fuselm (its kernels are A)")
    ap.add_argument("--rows", default="64,128,256")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--parts", default="shapes,steps", help="shapes, steps, or both")
    ap.add_argument("--context", type=int, default=15, help="cached tokens per row of the synthetic decode steps")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cold", action="store_true",
                    help="shapes with their weights from memory: each call reads the next of ~300 MB of copies")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ka, kb = tree_kernels(args.baseline.resolve()), get_kernels()
    assert kb is not None and kb.has_simd_dense, "this tree's kernels must load with the SIMD GEMM"
    rows = [int(r) for r in args.rows.split(",")]
    now = clock(args.threads)
    print(f"CPU: {build.cpu_model_name()}, {args.threads} thread(s), {kb.isa}; {args.baseline} -> this tree, "
          f"{args.rounds} alternated rounds, {'thread CPU' if args.threads == 1 else 'wall'} time")
    parts = args.parts.split(",")
    results = []
    if "shapes" in parts:
        results += run_shapes(ka, kb, args.shapes.split(","), rows, args.rounds, now, args.cold)
    if "steps" in parts:
        results += run_steps(ka, kb, rows, args.context, args.rounds, args.threads, now)
    if args.json:
        args.json.write_text(json.dumps({"cpu": build.cpu_model_name(), "threads": args.threads, "isa": kb.isa,
                                         "baseline": str(args.baseline), "results": results}, indent=1))


if __name__ == "__main__":
    main()
