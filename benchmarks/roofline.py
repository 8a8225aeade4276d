"""What fraction of the machine's roofline an offline run achieves, step by step.

Runs the same seeded offline workload as `fuselm bench throughput` (greedy, ignore_eos, float32
weights as run_all uses them), records every step's rows (cached and new tokens per sequence,
whether it samples) and wall time, measures the machine's peaks (fp32 FMA GFLOP/s with all
threads, stream and scattered-read bandwidth; before, during and after the run), and sets each
step's roofline time (fuselm/bench/roofline.py: max(FLOPs / FMA peak, bytes / bandwidth)) against
its measured time.
The tables split prompt steps (at least one prompt chunk) from decode steps (one token per row),
and group decode steps by batch size, where the balance between weight reads and arithmetic
shifts. The fraction over the whole run is roofline time / the generate call's wall time, less the
probes'. A second bound, "phase-serial", runs each step's matmuls and attention one after the other
at their own rooflines (compute-bound matmuls, memory-bound decode attention): what kernels at their
peaks reach without overlapping the two.

The VMs this runs on move their FMA rate and bandwidth by up to a third within seconds, so the peaks
are also probed between steps every --probe-every seconds of the run (the probes' time is left out of
the run's). The fraction is reported twice: against the best peaks any probe showed (the strict
figure), and against the peaks probed around each step (the better of the probe before it and the one
after), which rates a step against what the machine gave at the time.

    python benchmarks/roofline.py                              # 256 chat requests, float32
    python benchmarks/roofline.py --num-requests 32 --json roofline.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from offline_throughput import engine_options  # noqa: E402  (KEY=VALUE parsing shared with the other scripts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="chat", help="a `fuselm bench` workload (default: chat)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--bucket", type=int, default=32, help="decode-row bucket width of the batch table")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra engine option, e.g. max_num_seqs=256 (repeatable)")
    p.add_argument("--probe-every", type=float, default=10.0, metavar="SECONDS",
                   help="probe the peaks between steps this often during the run (0: before and after only)")
    p.add_argument("--json", type=Path, help="write peaks, totals, tables and per-step records here")
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.bucket < 1 or args.probe_every < 0:
        p.error("--num-requests and --bucket must be >= 1, --probe-every >= 0")
    return args


def summarize(steps: list[dict]) -> dict:
    keys = ("flops", "gemm_flops", "attention_flops", "weight_bytes", "kv_read_bytes", "kv_write_bytes",
            "compute_s", "memory_s", "roofline_s", "gemm_phase_s", "attention_phase_s", "phase_serial_s", "seconds",
            "tokens", "roofline_local_s", "phase_serial_local_s")
    out = {k: sum(s[k] for s in steps) for k in keys}
    out["steps"] = len(steps)
    out["fraction_of_roofline"] = out["roofline_s"] / out["seconds"] if out["seconds"] else None
    out["fraction_of_phase_serial"] = out["phase_serial_s"] / out["seconds"] if out["seconds"] else None
    out["fraction_of_local_roofline"] = out["roofline_local_s"] / out["seconds"] if out["seconds"] else None
    out["achieved_gflops"] = out["flops"] / out["seconds"] / 1e9 if out["seconds"] else None
    return out


def table(title: str, groups: dict[str, dict]) -> str:
    lines = [f"\n{title}", "| steps | count | tokens | GFLOP | weight+KV GB | compute-bound s | memory-bound s | "
             "roofline s | phase-serial s | measured s | achieved GFLOP/s | fraction | of phase-serial | "
             "of the roofline at the time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, g in groups.items():
        gb = (g["weight_bytes"] + g["kv_read_bytes"] + g["kv_write_bytes"]) / 1e9
        lines.append(f"| {name} | {g['steps']} | {g['tokens']} | {g['flops'] / 1e9:,.0f} | {gb:,.1f} | "
                     f"{g['compute_s']:.1f} | {g['memory_s']:.1f} | {g['roofline_s']:.1f} | {g['phase_serial_s']:.1f} | "
                     f"{g['seconds']:.1f} | {g['achieved_gflops']:.1f} | {g['fraction_of_roofline']:.0%} | "
                     f"{g['fraction_of_phase_serial']:.0%} | {g['fraction_of_local_roofline']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from fuselm.bench.report import machine_info, write_json
    from fuselm.bench.roofline import (ModelShape, Row, better_peaks, measure_peaks, peaks_around, roofline_seconds,
                                       step_cost)
    from fuselm.bench.throughput import run_throughput
    from fuselm.bench.workloads import Request, load_text, make_workload
    from fuselm.llm import LLM

    llm = LLM(dtype=args.dtype, quantization="none", **engine_options(args.engine_option))
    engine, runner = llm.engine, llm.engine.runner
    shape = ModelShape.from_config(runner.model_config)
    weight_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    kv_bytes = torch.empty((), dtype=runner.kv_dtype).element_size()
    block_bytes = runner.block_size * shape.kv_heads * shape.head_dim * kv_bytes  # one K block of one layer
    print(f"measuring the machine's peaks ({torch.get_num_threads()} threads) ...", file=sys.stderr, flush=True)
    peaks = measure_peaks(block_bytes)
    print("peaks: " + ", ".join(f"{k} {v:,.1f}" for k, v in peaks.items()), file=sys.stderr)

    text_ids = llm.get_tokenizer().encode(load_text(), add_special_tokens=False)
    requests = make_workload(args.workload, text_ids, args.num_requests, args.seed)
    run_throughput(llm, [Request(requests[0].prompt[:16], 4)], warmup=False)  # untimed warm-up
    steps: list[dict] = []
    schedule, step = engine.scheduler.schedule, engine.step

    def recording_schedule():
        out = schedule()
        if not out.is_empty:
            rows = [Row(r.num_computed_tokens, r.num_new_tokens, r.needs_sample) for r in out.scheduled]
            steps.append({"rows": rows, "kind": "prompt" if any(r.new > 1 for r in rows) else "decode"})
        return out

    probes: list[dict] = []  # during the run: {"at": seconds since the run began, "seconds": the probe's own, peaks}

    def timed_step():
        nonlocal last_probe
        before = len(steps)
        t = time.perf_counter()
        try:
            return step()
        finally:
            end = time.perf_counter()
            if len(steps) > before:
                steps[-1]["seconds"], steps[-1]["at"] = end - t, end - run_start
            if args.probe_every and end - last_probe >= args.probe_every:
                probe = measure_peaks(block_bytes)  # as before and after the run
                last_probe = time.perf_counter()
                probes.append({"at": end - run_start, "seconds": last_probe - end, **probe})

    engine.scheduler.schedule, engine.step = recording_schedule, timed_step
    run_start = last_probe = time.perf_counter()
    result = run_throughput(llm, requests, warmup=False)
    # The strict figure holds the run to the best peaks any probe showed (before, during, after). The local one
    # rates each step against the better of the probes either side of it (before the run, during, after).
    print("measuring the machine's peaks again ...", file=sys.stderr, flush=True)
    peaks_before, peaks_after = peaks, measure_peaks(block_bytes)
    peaks = better_peaks(peaks_before, peaks_after, *probes)
    timeline = [{"at": float("-inf"), **peaks_before}, *probes, {"at": float("inf"), **peaks_after}]
    for s in steps:
        s.update(step_cost(shape, s["rows"], weight_bytes, kv_bytes))
        s.update(roofline_seconds(s, peaks))
        local = roofline_seconds(s, peaks_around(timeline, s["at"]))
        s["roofline_local_s"], s["phase_serial_local_s"] = local["roofline_s"], local["phase_serial_s"]
        s["decode_rows"] = len(s["rows"])
    probe_seconds = sum(p["seconds"] for p in probes)
    elapsed = result["elapsed_s"] - probe_seconds  # the engine's time: the probes between steps are left out
    total = summarize(steps)
    whole_run = {"elapsed_s": elapsed, "roofline_s": total["roofline_s"],
                 "fraction_of_roofline": total["roofline_s"] / elapsed,
                 "phase_serial_s": total["phase_serial_s"],
                 "fraction_of_phase_serial": total["phase_serial_s"] / elapsed,
                 "roofline_local_s": total["roofline_local_s"],
                 "fraction_of_local_roofline": total["roofline_local_s"] / elapsed,
                 "probes_during_run": len(probes), "probe_seconds": probe_seconds,
                 "output_throughput": result["output_tokens"] / elapsed}
    by_kind = {k: summarize([s for s in steps if s["kind"] == k]) for k in ("prompt", "decode")}
    buckets: dict[str, list] = collections.defaultdict(list)
    for s in steps:
        if s["kind"] == "decode":
            lo = (s["decode_rows"] - 1) // args.bucket * args.bucket + 1
            buckets[f"decode, {lo}-{lo + args.bucket - 1} rows"].append(s)
    by_batch = {k: summarize(v) for k, v in sorted(buckets.items(), key=lambda kv: int(kv[0].split()[1].split("-")[0]))}

    machine = machine_info()
    print(f"{machine['cpu_model']}, {machine['cpu_cores']} cores, torch {machine['torch_version']}, "
          f"load average {machine.get('loadavg')}")
    print(f"{args.num_requests} {args.workload} requests, {args.dtype}: {elapsed:.1f} s, "
          f"{whole_run['output_throughput']:.1f} output tok/s, {len(steps)} steps")
    print(f"peaks before / after the run: FMA {peaks_before['fma_gflops']:.1f} / {peaks_after['fma_gflops']:.1f} GFLOP/s, "
          f"stream {peaks_before['stream_gbps']:.1f} / {peaks_after['stream_gbps']:.1f} GB/s, scattered "
          f"{peaks_before['scattered_gbps']:.1f} / {peaks_after['scattered_gbps']:.1f} GB/s; the best of every probe:")
    print(f"peaks: FMA {peaks['fma_gflops']:.1f} GFLOP/s (torch.mm {peaks['torch_mm_gflops']:.1f}"
          + (f", fuselm C GEMM {peaks['fuselm_gemm_gflops']:.1f}" if "fuselm_gemm_gflops" in peaks else "")
          + f"), stream {peaks['stream_gbps']:.1f} GB/s, scattered reads of {peaks['scattered_block_bytes']} B blocks "
          f"{peaks['scattered_gbps']:.1f} GB/s")
    if probes:
        def spread(key: str) -> str:
            return f"{min(p[key] for p in probes):.1f}-{max(p[key] for p in probes):.1f}"

        print(f"{len(probes)} probes during the run ({probe_seconds:.1f} s, left out of the run's time): FMA "
              f"{spread('fma_gflops')} GFLOP/s, stream {spread('stream_gbps')} GB/s, scattered "
              f"{spread('scattered_gbps')} GB/s")
    print(table("By step kind", {**by_kind, "all steps": total}))
    print(table("Decode steps by batch size", by_batch))
    print(f"\nFraction of the roofline over the whole run: {whole_run['fraction_of_roofline']:.0%} "
          f"(roofline {total['roofline_s']:.1f} s of {elapsed:.1f} s; the steps themselves took {total['seconds']:.1f} s)")
    print(f"Matmuls and attention one after the other, each at its own roofline: {total['phase_serial_s']:.1f} s "
          f"({total['roofline_s'] / total['phase_serial_s']:.0%} of the roofline at best; this run reached "
          f"{whole_run['fraction_of_phase_serial']:.0%} of that bound)")
    print(f"Against the peaks probed around each step (the machine's speed at the time): "
          f"{whole_run['fraction_of_local_roofline']:.0%} (roofline {total['roofline_local_s']:.1f} s)")
    if args.json:
        for s in steps:
            s["rows"] = [[r.cached, r.new, int(r.samples)] for r in s["rows"]]
        path = write_json({"benchmark": "roofline", "machine": machine, "workload": {
            "name": args.workload, "num_requests": args.num_requests, "seed": args.seed}, "dtype": args.dtype,
            "kv_dtype": str(runner.kv_dtype).removeprefix("torch."), "model_shape": shape.__dict__, "peaks": peaks,
            "peaks_before": peaks_before, "peaks_after": peaks_after, "probe_every_s": args.probe_every,
            "probes": probes,
            "whole_run": whole_run, "by_kind": by_kind, "all_steps": total, "decode_by_batch": by_batch,
            "steps": steps}, args.json)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
