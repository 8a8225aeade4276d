"""Where the seconds of an offline run go: by step kind, by component, by decode-batch size.

`fuselm bench throughput` gives one number for a workload; this script runs the same offline
workload (same seeded requests, greedy, ignore_eos) and times each engine step, split into

- step kinds: "decode" steps (every row one token: the one-call C decode step when the CPU
  kernels are on) and "prompt" steps (at least one prompt chunk: each layer in two C halves
  around torch attention);
- components: scheduling, building the packed batch, the layer halves / the one-call step,
  attention (with the decode kernel, K/V writes and torch SDPA inside it shown apart), the LM
  head, sampling and the engine's update;
- the Python garbage collector's passes, wherever they fall (also counted in that component);
- decode-batch size: steps bucketed by their number of decode rows, with the prompt tokens they
  carried, which shows how much of the run is the prefill-heavy start and the shrinking tail.

It wraps the engine's own methods (and torch's SDPA, for this process) with timers, so the totals
are the engine's time, not a model of it; the wrapping costs a few microseconds per call. Timings are wall time of the calling
thread (the OpenMP workers are inside the C calls).

    python benchmarks/step_breakdown.py                        # 256 chat requests, float32
    python benchmarks/step_breakdown.py --num-requests 64 --engine-option max_num_seqs=256
    python benchmarks/step_breakdown.py --shared-prefix 2000 --num-requests 64 --output-len 128 \
        --quantization gguf --engine-option enable_cascade_attention=true  # shared_prefix.py's end-to-end run
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from offline_throughput import engine_options  # noqa: E402  (KEY=VALUE parsing shared with the other script)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="chat", help="a `fuselm bench` workload (default: chat)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantization", default="none", help="'none' keeps the float weights (as run_all does); "
                                                           "'gguf' the GGUF file's own (as shared_prefix.py does)")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="S",
                   help="instead of --workload: shared_prefix.py's requests, one S-token prefix and a tail of their own")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request with --shared-prefix")
    p.add_argument("--bucket", type=int, default=16, help="decode-row bucket width of the batch table")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra engine option, e.g. max_num_seqs=256 (repeatable)")
    p.add_argument("--json", type=Path, help="also write the per-step records here")
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.bucket < 1:
        p.error("--num-requests and --bucket must be >= 1")
    return args


ROWS = ["STEP total", "schedule", "build batch", "norm+qkv+rotary (C)", "attention (all)", "  decode kernel",
        "  shared-prefix kernel", "  prompt-chunk kernel", "  K/V writes (torch)", "  torch SDPA", "o+MLP (C)", "one-call decode step (C)", "LM head", "sample", "update",
        "Python GC"]


class Timers:
    """Seconds and calls per (step kind, component); `kind` is set by the scheduler wrapper."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self.kind = "decode"

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                key = (self.kind, label)
                self.seconds[key] += time.perf_counter() - t
                self.calls[key] += 1

        setattr(owner, name, timed)

    def time_garbage_collections(self) -> None:
        """Count the cyclic garbage collector's passes (inside whichever component triggered them)."""
        started = [0.0]

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                self.seconds[(self.kind, "Python GC")] += time.perf_counter() - started[0]
                self.calls[(self.kind, "Python GC")] += 1

        gc.callbacks.append(on_gc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import fuselm.layers.attention as layer_attention_module
    import fuselm.models.llama as llama_module
    import fuselm.layers.paged_attention as attention_module
    from fuselm.bench.throughput import run_throughput
    from fuselm.bench.workloads import Request, load_text, make_workload
    from fuselm.llm import LLM

    llm = LLM(dtype=args.dtype, quantization=None if args.quantization == "gguf" else args.quantization,
              **engine_options(args.engine_option))
    engine, runner = llm.engine, llm.engine.runner
    model = runner.model
    if args.shared_prefix:
        from shared_prefix import prompt_ids

        requests = [Request(p, args.output_len) for p in prompt_ids(args.shared_prefix, args.num_requests,
                                                                     seed=args.shared_prefix)]
    else:
        text_ids = llm.get_tokenizer().encode(load_text(), add_special_tokens=False)
        requests = make_workload(args.workload, text_ids, args.num_requests, args.seed)
    run_throughput(llm, [Request(requests[0].prompt[:16], 4)], warmup=False)  # untimed warm-up, out of the tables

    timers = Timers()
    steps: list[dict] = []
    schedule = engine.scheduler.schedule

    def classify_and_schedule():
        out = schedule()
        if not out.is_empty:
            prompt_tokens = sum(r.num_new_tokens for r in out.scheduled if r.num_new_tokens > 1)
            timers.kind = "prompt" if prompt_tokens else "decode"
            steps.append({"decode_rows": len(out.scheduled) - sum(r.num_new_tokens > 1 for r in out.scheduled),
                          "prompt_tokens": prompt_tokens})
        return out

    engine.scheduler.schedule = classify_and_schedule
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(runner, "_build_batch", "build batch")
    timers.wrap(model, "compute_logits", "LM head")
    timers.wrap(runner, "_sample_one", "sample")
    timers.wrap(engine, "_update", "update")
    timers.wrap(llama_module, "paged_attention", "attention (all)")  # between the C layer halves
    timers.wrap(layer_attention_module, "paged_attention", "attention (all)")  # inside the torch layers
    timers.wrap(attention_module, "write_kv", "  K/V writes (torch)")
    timers.wrap(attention_module.F, "scaled_dot_product_attention", "  torch SDPA")
    if runner.cpu_kernels is not None:
        timers.wrap(runner.cpu_kernels, "paged_decode_attention", "  decode kernel")
        timers.wrap(runner.cpu_kernels, "cascade_attention", "  shared-prefix kernel")
        timers.wrap(runner.cpu_kernels, "chunk_attention", "  prompt-chunk kernel")
    fused = model.c_layers
    if fused is not None:
        timers.wrap(fused, "run", "one-call decode step (C)")
        timers.wrap(fused, "attention_inputs", "norm+qkv+rotary (C)")
        timers.wrap(fused, "attention_outputs", "o+MLP (C)")
    step = engine.step

    def timed_step():
        t = time.perf_counter()
        try:
            return step()
        finally:
            if steps and "seconds" not in steps[-1]:
                steps[-1]["seconds"] = time.perf_counter() - t
                timers.seconds[(timers.kind, "STEP total")] += steps[-1]["seconds"]
                timers.calls[(timers.kind, "STEP total")] += 1

    engine.step = timed_step
    timers.time_garbage_collections()
    result = run_throughput(llm, requests, warmup=False)  # what `fuselm bench throughput` times
    elapsed, produced = result["elapsed_s"], result["output_tokens"]

    workload = f"shared-prefix ({args.shared_prefix} tokens)" if args.shared_prefix else args.workload
    print(f"{args.num_requests} {workload} requests: {elapsed:.1f} s, {produced} output tokens, "
          f"{produced / elapsed:.1f} output tok/s, {len(steps)} steps")
    print("\n| step kind | component | seconds | calls |\n|---|---|---:|---:|")
    for kind in ("prompt", "decode"):
        for label in ROWS:
            if (kind, label) in timers.seconds:
                print(f"| {kind} | {label} | {timers.seconds[(kind, label)]:.2f} | {timers.calls[(kind, label)]} |")
    print(f"\n| decode rows | steps | seconds | decode tokens | prompt tokens | ms per step |\n|---|---:|---:|---:|---:|---:|")
    buckets: dict[int, list] = collections.defaultdict(lambda: [0, 0.0, 0, 0])
    for s in steps:
        b = buckets[s["decode_rows"] // args.bucket * args.bucket]
        b[0] += 1
        b[1] += s.get("seconds", 0.0)
        b[2] += s["decode_rows"]
        b[3] += s["prompt_tokens"]
    for lo in sorted(buckets):
        n, sec, dec, pt = buckets[lo]
        print(f"| {lo}-{lo + args.bucket - 1} | {n} | {sec:.1f} | {dec} | {pt} | {1000 * sec / n:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"elapsed_s": elapsed, "output_tokens": produced, "steps": steps}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
