"""Time to first token of one prompt on an idle engine, this tree against another checkout.

A prompt that arrives while nothing else runs is computed in steps of prompt chunks alone: no decode
row shares them, so what these steps take (the projections, the chunks' attention) is the whole wait.
Each tree runs in its own process (PYTHONPATH), A B B A over --pairs pairs, so that a change in the
Python path as well as in the C kernels is compared; within a process every prompt length takes the
best of --repeats prompts (random token ids, prefix caching off, one output token) after one to warm up. The
embedded model's weights are dequantised (--quantization none) or kept as its GGUF has them (gguf).

    python benchmarks/prefill_latency.py --baseline /tmp/before --prompt-lens 128,512,2000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> None:
    import torch

    from fuselm import LLM, SamplingParams

    llm = LLM(dtype=args.dtype, num_threads=args.threads, quantization=None if args.quantization == "gguf" else "none",
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    g = torch.Generator().manual_seed(args.seed)
    vocab = llm.engine.runner.model_config.vocab_size
    seconds = {}
    for n in args.lens:
        times = []
        for _ in range(args.repeats + 1):  # the first warms up
            ids = torch.randint(100, vocab - 100, (n,), generator=g).tolist()
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            times.append(time.perf_counter() - start)
        seconds[n] = min(times[1:])
    import fuselm

    print("RESULT " + json.dumps({"seconds": seconds, "plan": llm.engine.runner.plan.summary(),
                                  "fuselm": fuselm.__file__}), flush=True)


def run_tree(tree: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--prompt-lens", ",".join(map(str, args.lens)),
           "--repeats", str(args.repeats), "--dtype", args.dtype, "--threads", str(args.threads), "--seed",
           str(args.seed), "--quantization", args.quantization]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    if not Path(result["fuselm"]).resolve().is_relative_to(tree.resolve()):  # the tree asked for, not another
        raise SystemExit(f"{tree}: the child imported fuselm from {result['fuselm']}")
    return {int(n): s for n, s in result["seconds"].items()} | {"plan": result["plan"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="another checkout of fuselm (A)")
    ap.add_argument("--prompt-lens", default="128,512,2000")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    ap.add_argument("--quantization", default="none", choices=("none", "gguf"),
                    help="none: the embedded model's weights dequantised to --dtype; gguf: kept as the GGUF has them")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.lens = [int(x) for x in args.prompt_lens.split(",")]
    if args.child:
        child(args)
        return
    if args.baseline is None:
        ap.error("--baseline is required")
    sys.path.insert(0, str(HERE.parent))
    from fuselm.bench.report import machine_info

    this = HERE.parent
    runs = {"baseline": [], "this tree": []}
    for i in range(args.pairs):
        order = [("baseline", args.baseline), ("this tree", this)]
        for name, tree in order if i % 2 == 0 else order[::-1]:
            runs[name].append(run_tree(tree, args))
            print(f"pair {i + 1} {name}: " + ", ".join(f"{n} tokens {runs[name][-1][n] * 1e3:.0f} ms"
                                                       for n in args.lens), flush=True)
    rows = []
    for n in args.lens:
        a = statistics.median(r[n] for r in runs["baseline"])
        b = statistics.median(r[n] for r in runs["this tree"])
        rows.append({"prompt_tokens": n, "baseline_s": a, "this_s": b, "ratio": a / b,
                     "baseline_runs_s": [r[n] for r in runs["baseline"]],
                     "this_runs_s": [r[n] for r in runs["this tree"]]})
        print(f"{n:5d}-token prompt, idle engine: {a * 1e3:7.1f} -> {b * 1e3:7.1f} ms (median of {args.pairs} "
              f"processes each, best of {args.repeats} within one); {a / b:.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "prefill_latency", "machine": machine_info() | {"threads": args.threads}, "dtype": args.dtype,
            "quantization": args.quantization,
            "pairs": args.pairs, "repeats": args.repeats, "baseline": str(args.baseline),
            "plans": {name: r[0]["plan"] for name, r in runs.items()}, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
