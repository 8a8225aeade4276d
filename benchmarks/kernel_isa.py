"""A/B of fuselm's C kernels between two ISA variants (default avx2 against avx512), in one process.

Both libraries are loaded side by side (fuselm/kernels/cpu.py load_kernels) and each kernel is
timed on the same inputs, rounds interleaving the variants so that a noisy neighbour slows both
alike; each cell is the median over rounds, or the best (--best: on a loaded machine, where
most rounds measure the neighbours). Kernels: the float32 panel GEMM (dense_linear.c) and
the quantised matmul (quant_linear.c, int4 g32 and int8 g32) at SmolLM2-135M's shapes, and
float32 decode attention (paged_attention.c) over SmolLM2's heads: `rows` sequences of
`--context` tokens whose blocks lie shuffled in a pool twice their size.

    python benchmarks/kernel_isa.py [--a avx2] [--b avx512] [--rows 1,8,64,256] [--rounds 15] [--threads 1] [--best] [--json out.json]
    python benchmarks/kernel_isa.py --kernels attention --rows 1,8,64,128 --context 450
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fuselm.kernels.build import cpu_model_name
from fuselm.kernels.cpu import load_kernels
from fuselm.quant.formats import quantize

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16  # SmolLM2-135M's attention, fuselm's default block size


def time_pair(fa, fb, rounds: int, best: bool) -> tuple[float, float]:
    fa(), fb()
    ta, tb = [], []
    for i in range(rounds):
        for fn, out in ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    pick = min if best else statistics.median
    return pick(ta), pick(tb)


def attention_inputs(rows: int, context: int, g: torch.Generator) -> tuple:
    """q [rows, heads, dim], caches of twice the blocks needed, shuffled block tables, context lengths."""
    per_row = -(-context // BLOCK)
    num_blocks = 2 * rows * per_row
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    table = torch.randperm(num_blocks, generator=g)[: rows * per_row].view(rows, per_row).contiguous()
    lens = torch.full((rows,), context, dtype=torch.int64)
    return torch.randn(rows, HEADS, HEAD_DIM, generator=g), k_cache, v_cache, table, lens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", default="avx2")
    ap.add_argument("--b", default="avx512")
    ap.add_argument("--rows", default="1,8,64,256")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--kernels", default="fp32,int4g32,int8g32,attention")
    ap.add_argument("--context", type=int, default=450, help="tokens per sequence of the attention kernel")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, help="torch and kernel threads (default: torch's)")
    ap.add_argument("--best", action="store_true", help="report each cell's best round instead of the median")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ka, kb = load_kernels(args.a), load_kernels(args.b)
    assert ka is not None and kb is not None, "both variants must build on this CPU"
    rows = [int(r) for r in args.rows.split(",")]
    print(f"CPU: {cpu_model_name()}, {torch.get_num_threads()} threads; {args.a} vs {args.b}, {'best' if args.best else 'median'} of "
          f"{args.rounds} interleaved rounds, us")
    results = []
    g = torch.Generator().manual_seed(0)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        w = torch.randn(n, k, generator=g) * 0.05
        for kernel in args.kernels.split(","):
            if kernel == "attention":
                continue
            if kernel == "fp32":
                pa, pb = ka.dense_pack(w), kb.dense_pack(w)
                fns = (lambda x: ka.dense_linear(x, pa, None, n), lambda x: kb.dense_linear(x, pb, None, n))
            else:
                q = quantize(w, kernel[:4], int(kernel[5:]))
                fns = (lambda x: ka.qlinear(x, q, None), lambda x: kb.qlinear(x, q, None))
            for m in rows:
                x = torch.randn(m, k, generator=g)
                ta, tb = time_pair(lambda: fns[0](x), lambda: fns[1](x), args.rounds, args.best)
                results.append({"shape": name, "kernel": kernel, "rows": m, args.a: ta * 1e6, args.b: tb * 1e6})
                print(f"{name:8s} {kernel:8s} {m:4d} rows: {ta * 1e6:9.0f} vs {tb * 1e6:9.0f}  ({ta / tb:.2f}x)",
                      flush=True)
    if "attention" in args.kernels.split(","):
        for m in rows:
            q, k_cache, v_cache, table, lens = attention_inputs(m, args.context, g)
            out_a, out_b = torch.empty_like(q), torch.empty_like(q)
            ta, tb = time_pair(lambda: ka.paged_decode_attention(q, out_a, k_cache, v_cache, table, lens, HEAD_DIM ** -0.5),
                               lambda: kb.paged_decode_attention(q, out_b, k_cache, v_cache, table, lens, HEAD_DIM ** -0.5),
                               args.rounds, args.best)
            results.append({"shape": f"attention, {args.context} tokens", "kernel": "attention", "rows": m,
                            args.a: ta * 1e6, args.b: tb * 1e6})
            print(f"attention {args.context:5d} tok {m:4d} rows: {ta * 1e6:9.0f} vs {tb * 1e6:9.0f}  ({ta / tb:.2f}x)",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model_name(), "threads": torch.get_num_threads(), "a": args.a, "b": args.b,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
