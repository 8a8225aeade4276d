"""A/B of a dense int4 or int8 g32 projection in sixteen-row tiles (kernels/int4_rows16.c, int8_rows16.c) against
the QuantWeight layout (quant_rows.c's rows), in one process, per row count: the row-streaming kernels and the
dequantise-then-float-GEMM path that QuantLinear takes for prompt chunks.

Shapes: SmolLM2-135M's projections (the embedded Q4_1 model) and the attention projections of
benchmarks/moe.py's Mixtral-like model (hidden 1024, 8 query and 2 KV heads of 128). Methods, each on the
same random weight and activations, rounds interleaved so a noisy neighbour slows all alike; each cell is
the process CPU time per call (--wall: wall time), the median over rounds (--best: the least, for a loaded machine):

    rows          fuselm_qlinear on the QuantWeight (quant_rows.c)
    tiles         fuselm_qlinear on the tiles (int4_rows16.c or int8_rows16.c)
    rows-gemm     fuselm_dequantize of the QuantWeight into scratch, then F.linear
    tiles-gemm    the same from the tiles

    python benchmarks/tiles_layer.py [--bits 4|8] [--rows 1,8,64,256,512] [--threads 1] [--rounds 15] [--best] [--wall]
                                     [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from fuselm.kernels.build import cpu_model_name
from fuselm.kernels.cpu import get_kernels
from fuselm.quant.formats import quantize_int4, quantize_int8
from fuselm.quant.int4_rows16 import Int4Rows16
from fuselm.quant.int8_rows16 import Int8Rows16

SHAPES = {"smollm2 qkv": (960, 576), "smollm2 o": (576, 576), "smollm2 gate_up": (3072, 576),
          "smollm2 down": (576, 1536), "mixtral qkv": (1536, 1024), "mixtral o": (1024, 1024),
          "smollm2 lm_head": (49152, 576)}  # the embedded model's tied LM head (int8: its Q8_0 table)
DEFAULT_SHAPES = [name for name in SHAPES if name != "smollm2 lm_head"]


def cpu_time(fn, rounds: int, clock=time.process_time) -> list[float]:
    fn()
    out = []
    for _ in range(rounds):
        start = clock()
        fn()
        out.append(clock() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4, help="int4 (GGUF Q4_0/Q4_1) or int8 (Q8_0) g32")
    ap.add_argument("--rows", default="1,8,64,256,512")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    ap.add_argument("--methods", default="rows,tiles,rows-gemm,tiles-gemm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--best", action="store_true", help="the least time over rounds instead of the median")
    ap.add_argument("--wall", action="store_true", help="wall time instead of the process's CPU time (which, with "
                    "more than one thread, also counts what idle threads spin)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = get_kernels()
    if kernels is None or not getattr(kernels, f"int{args.bits}_rows16_available"):
        raise SystemExit(f"needs fuselm's C kernels with int{args.bits} tiles (int4: AVX2 or AVX512_VNNI, int8: "
                         "AVX512_VNNI)")
    g = torch.Generator().manual_seed(0)
    methods = args.methods.split(",")
    pick = min if args.best else statistics.median
    results = []
    print(f"# {cpu_model_name()}, int{args.bits} g32, {args.threads} thread(s), {'wall' if args.wall else 'CPU'} "
          f"time per call in us "
          f"({'best' if args.best else 'median'} of {args.rounds} interleaved rounds)")
    print(f"{'shape':18} {'N x K':>11} {'rows':>5} " + " ".join(f"{m:>11}" for m in methods))
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        quantize, tiled = (quantize_int4, Int4Rows16) if args.bits == 4 else (quantize_int8, Int8Rows16)
        q = quantize(torch.randn(n, k, generator=g) * k ** -0.5, 32)
        tiles = tiled.pack(q)
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, generator=g)
            calls = {"rows": lambda: kernels.qlinear(x, q, None), "tiles": lambda: kernels.qlinear(x, tiles, None),
                     "rows-gemm": lambda: F.linear(x, kernels.dequantize(q)),
                     "tiles-gemm": lambda: F.linear(x, kernels.dequantize(tiles))}
            times: dict[str, list[float]] = {meth: [] for meth in methods}
            for r in range(args.rounds):  # interleaved, the order reversed every other round
                for meth in (methods if r % 2 == 0 else methods[::-1]):
                    times[meth].extend(cpu_time(calls[meth], 1, time.perf_counter if args.wall else time.process_time))
            cell = {meth: pick(t) * 1e6 for meth, t in times.items()}
            results.append({"shape": name, "n": n, "k": k, "rows": m, "us": cell})
            print(f"{name:18} {f'{n}x{k}':>11} {m:5d} " + " ".join(f"{cell[meth]:11.1f}" for meth in methods))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model_name(), "bits": args.bits, "threads": args.threads,
                       "clock": "wall" if args.wall else "process CPU", "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
