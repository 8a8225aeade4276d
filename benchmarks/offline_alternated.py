"""A whole offline run with this tree's C kernels against another checkout's, alternated in one process.

On a 2-vCPU VM the same offline run can take 67 s or 109 s within the hour, so a kernel change that moves a
decode step by 5-10% cannot be read off two separate runs. This loads two engines on the embedded model, one on
each tree's kernels (the baseline's built by its own build.py, as benchmarks/decode_gemm.py does), and runs the
seeded workload of benchmarks/roofline.py (greedy, ignore_eos) on each in turn, pair after pair, the order
swapped every pair, each pair on requests of its own seed (seed + pair: no pair hits an earlier pair's prompts in
the prefix cache); it prints each pair's times and ratio, and whether the two engines give the same greedy tokens
on the workload's first 16 prompts.

    python benchmarks/offline_alternated.py --baseline /tmp/before --num-requests 128 --pairs 4
    python benchmarks/offline_alternated.py --baseline /tmp/before --workload random --num-requests 1 \
        --workload-arg input_len=2000 --workload-arg output_len=256   # batch 1 after a long prompt
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from decode_gemm import tree_kernels  # noqa: E402  (another checkout's kernels, built by its own build.py)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="another checkout of fuselm (its kernels are A)")
    ap.add_argument("--workload", default="chat", help="a `fuselm bench` workload (default: chat)")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--workload-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the workload, as `fuselm bench throughput --workload-arg` takes it; repeatable")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.num_requests < 1 or args.pairs < 1:
        ap.error("--num-requests and --pairs must be >= 1")
    from fuselm.bench.workloads import parse_workload_args

    try:
        options = parse_workload_args(args.workload, args.workload_arg)
    except ValueError as e:
        ap.error(str(e))

    import fuselm.kernels.cpu as cpu
    from fuselm.bench.report import machine_info, write_json
    from fuselm.bench.throughput import run_throughput
    from fuselm.bench.workloads import Request, load_text, make_workload
    from fuselm.llm import LLM

    own = cpu.get_kernels()
    if own is None:
        raise SystemExit("this tree's CPU kernels did not load: nothing to compare")
    kernels = {"baseline": tree_kernels(args.baseline), "this": own}
    engines = {}
    original = cpu.get_kernels
    try:
        for name, k in kernels.items():  # the execution plan takes its kernels from get_kernels() at load
            cpu.get_kernels = lambda k=k: k
            engines[name] = LLM(dtype=args.dtype, quantization="none")
    finally:
        cpu.get_kernels = original
    ids = engines["this"].get_tokenizer().encode(load_text(), add_special_tokens=False)
    # each pair its own requests (seed + pair): a pair never finds an earlier pair's prompts in the prefix cache
    workloads = [make_workload(args.workload, ids, args.num_requests, args.seed + p, **options)
                 for p in range(args.pairs)]
    requests = workloads[0]
    for llm in engines.values():
        run_throughput(llm, [Request(requests[0].prompt[:16], 4)], warmup=False)  # untimed warm-up

    pairs = []
    for p in range(args.pairs):
        requests = workloads[p]
        seconds = {}
        for name in ("baseline", "this") if p % 2 == 0 else ("this", "baseline"):
            result = run_throughput(engines[name], requests, warmup=False)
            seconds[name] = result["elapsed_s"]
        pairs.append({**seconds, "ratio": seconds["baseline"] / seconds["this"]})
        print(f"pair {p + 1}: baseline {seconds['baseline']:.1f} s, this tree {seconds['this']:.1f} s, "
              f"{pairs[-1]['ratio']:.3f}x", flush=True)
    ratios = [q["ratio"] for q in pairs]
    from fuselm.sampling_params import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(r.prompt)} for r in requests[:16]]
    tokens = {name: [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
              for name, llm in engines.items()}
    same = tokens["baseline"] == tokens["this"]
    machine = machine_info()
    print(f"{machine['cpu_model']}: {args.num_requests} {args.workload} requests, {args.dtype}; pair ratios "
          f"{min(ratios):.3f}-{max(ratios):.3f}x, median {statistics.median(ratios):.3f}x; same tokens: {same}")
    if args.json:
        write_json({"benchmark": "offline_alternated", "machine": machine, "baseline": str(args.baseline),
                    "workload": {"name": args.workload, "num_requests": args.num_requests, "seed": args.seed,
                                 "options": options},
                    "dtype": args.dtype, "pairs": pairs, "median_ratio": statistics.median(ratios),
                    "same_tokens": same}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
