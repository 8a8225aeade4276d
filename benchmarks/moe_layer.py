"""One MoE layer's routed experts on fuselm's C kernels, alone (not a test): time and bytes/s per format.

benchmarks/moe.py measures whole models, which takes many minutes; this times only the grouped
expert call (GroupedExperts -> kernels/moe.c) of one layer of benchmarks/moe.py's shapes (`--shape`:
mixtral, hidden 1024 and 32 experts of 512, top-4; qwen2moe, 64 experts of 256, top-8, the routed part)
for a few rows, in float32 and in the kept quantised formats (int4 g32 as GGUF Q4_0 loads, int8 g32 as
Q8_0), with random weights made directly in those formats. Sixteen layers are cycled, a different random
routing each call, so the routed experts come from memory (16 Mixtral-like layers are 3.2 GB at float32,
0.4-0.7 GB quantised: far beyond any cache), as in a decode step.

Bytes per call at one row are the routed experts' gate, up and down as stored. On a VM the memory bandwidth
moves by half from one minute to the next (a 256 MB array read at 57-64 GB/s in one format's repeats and at
31-36 in the next format's, one process on a 2-vCPU Zen 4 guest), so each repeat first measures two reads and
then times the layer, and each share is the median over repeats of the layer's bytes/s over the read just
before it:

- `rows1_share_of_stream`: the roofline tool's stream read (fuselm/bench/roofline.py `measure_stream_gbps`, a sum
  over a fresh 256 MB array, same threads);
- `rows1_share_of_weight_read`: a plain read (an int64 max) of the very bytes the layers hold, all 16
  layers' expert weights: what reading them at all costs where they happen to lie.

With --threads 1 each call's CPU time is reported too, which other processes on a loaded machine disturb
less than wall time.

    .venv/bin/python benchmarks/moe_layer.py                       # all formats, 1 and 4 rows, all threads
    .venv/bin/python benchmarks/moe_layer.py --formats int4 --threads 1
    .venv/bin/python benchmarks/moe_layer.py --shape qwen2moe --formats int4,int8 --rows 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fuselm.bench.roofline import measure_stream_gbps
from fuselm.kernels.build import cpu_model_name
from fuselm.kernels.cpu import get_kernels
from fuselm.layers.moe import GroupedExperts
from fuselm.quant.formats import QuantWeight

SHAPES = {"mixtral": (32, 1024, 512, 4), "qwen2moe": (64, 1024, 256, 8)}  # experts, hidden, width, top-k
LAYERS = {"float32": 4, "int4": 16, "int8": 16}


def weight_read_gbps(tensors: list[torch.Tensor]) -> float:
    """The best of three plain reads of `tensors` (an integer max over each, at memory speed)."""
    views = [t.reshape(-1).view(torch.uint8) for t in tensors]
    views = [v.view(torch.int64) if v.numel() % 8 == 0 else v for v in views]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for v in views:
            v.max()
        best = min(best, time.perf_counter() - start)
    return sum(v.numel() * v.element_size() for v in views) / best / 1e9


def expert_weights(fmt: str, experts: int, n: int, k: int, g: torch.Generator):
    """One projection of every expert: [E, n, k] floats or a QuantWeight of E * n rows."""
    rows = experts * n
    if fmt == "int4":
        return QuantWeight(4, 32, (rows, k), torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8, generator=g),
                           (torch.rand(rows, k // 32, generator=g) * 0.01).half(),
                           (torch.rand(rows, k // 32, generator=g) * -0.08).half(), "gguf:Q4_0")
    if fmt == "int8":
        return QuantWeight(8, 32, (rows, k), torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=g),
                           (torch.rand(rows, k // 32, generator=g) * 0.001).half(), None, "gguf:Q8_0")
    return torch.randn(experts, n, k, generator=g) * k ** -0.5


def layer_figures(fmt: str, shape: str, rows_list: list[int], calls_per_layer: int, repeats: int) -> dict:
    EXPERTS, HIDDEN, WIDTH, TOP_K = SHAPES[shape]
    kernels = get_kernels()
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(LAYERS[fmt]):
        layer = GroupedExperts(EXPERTS, HIDDEN, WIDTH)
        layer.load(*(expert_weights(fmt, EXPERTS, n, k, g) for n, k in ((WIDTH, HIDDEN), (WIDTH, HIDDEN), (HIDDEN, WIDTH))))
        reason = layer.use_cpu_kernels(kernels, torch.float32)
        if reason is not None:
            raise SystemExit(f"{fmt}: the C expert kernel does not run here ({reason})")
        layers.append(layer)
    per_expert = sum(t.numel() * t.element_size() for t in layers[0].weight_tensors()) / EXPERTS
    out = {"kind": layers[0].kind, "routed_bytes_at_one_row": int(TOP_K * per_expert)}
    for rows in rows_list:
        x = torch.randn(rows, HIDDEN, generator=g)
        weights = torch.full((rows, TOP_K), 1.0 / TOP_K)
        calls = [(layer, torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(rows)]))
                 for _ in range(calls_per_layer) for layer in layers]
        for layer, ids in calls[:len(layers)]:
            layer(x, ids, weights)  # first touch, thread pool
        wall = cpu = float("inf")
        pairs = []  # (stream read GB/s, weight read GB/s, layer GB/s at one row) per repeat
        held = [t for layer in layers for t in layer.weight_tensors()]
        for _ in range(repeats):
            stream = measure_stream_gbps(256, 3)["stream_read_gbps"] if rows == 1 else None
            weight_read = weight_read_gbps(held) if rows == 1 else None
            start, start_cpu = time.perf_counter(), time.process_time()
            for layer, ids in calls:
                layer(x, ids, weights)
            seconds = (time.perf_counter() - start) / len(calls)
            wall = min(wall, seconds)
            cpu = min(cpu, (time.process_time() - start_cpu) / len(calls))
            if stream is not None:
                pairs.append((round(stream, 2), round(weight_read, 2), round(TOP_K * per_expert / seconds / 1e9, 2)))
        out[f"rows{rows}_us"] = round(wall * 1e6, 1)
        if torch.get_num_threads() == 1:
            out[f"rows{rows}_cpu_us"] = round(cpu * 1e6, 1)
        if rows == 1:
            out["rows1_gb_s"] = round(TOP_K * per_expert / wall / 1e9, 2)
            out["rows1_stream_weight_read_and_layer_gb_s"] = pairs
            out["rows1_share_of_stream"] = round(statistics.median(layer / stream for stream, _, layer in pairs), 3)
            out["rows1_share_of_weight_read"] = round(statistics.median(layer / read for _, read, layer in pairs), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    ap.add_argument("--formats", default="float32,int4,int8", help=f"comma-separated, of {sorted(LAYERS)}")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--calls-per-layer", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stream = measure_stream_gbps()
    result = {"cpu": cpu_model_name(), "shape": args.shape, "threads": args.threads,
              "load_average_at_start": os.getloadavg()[0], "stream_gbps_at_start": round(stream["stream_gbps"], 2)}
    for fmt in args.formats.split(","):
        if fmt not in LAYERS:
            raise SystemExit(f"unknown format {fmt!r}: use {sorted(LAYERS)}")
        figures = layer_figures(fmt, args.shape, [int(r) for r in args.rows.split(",")], args.calls_per_layer,
                                args.repeats)
        result[fmt] = figures
    result["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
