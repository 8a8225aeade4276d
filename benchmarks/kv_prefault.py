"""The offline workload with the KV pool's pages mapped ahead of the steps (fuselm/runner/kv_prefault.py) and without.

Two engines on the embedded model, one with the mapping ahead and one leaving each page to its first write, run
the seeded chat workload of benchmarks/roofline.py in batches, each batch on both engines in turn (the order
swapped every batch), so that both meet the same phase of a VM whose speed drifts by 1.6x within the hour. Each
engine keeps taking never-used blocks of its own pool (5.5 GiB by default; two of them are held) until the pool
has been handed out once, so keep batches x requests within that (16 x 16 chat requests reach ~5,300 of ~8,000
blocks). It prints each batch's seconds and ratio, the totals, the system time and minor page faults of each
engine's runs (populating counts its pages as faults too), and whether the two give the same greedy tokens on
the workload's first 16 prompts.

    python benchmarks/kv_prefault.py --batches 16 --batch-requests 16 --json results.json
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="chat", help="a `fuselm bench` workload (default: chat)")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-requests", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.batches < 1 or args.batch_requests < 1:
        ap.error("--batches and --batch-requests must be >= 1")

    from fuselm.bench.report import machine_info, write_json
    from fuselm.bench.throughput import run_throughput
    from fuselm.bench.workloads import Request, load_text, make_workload
    from fuselm.llm import LLM
    from fuselm.sampling_params import SamplingParams

    engines = {}
    for on in (False, True):
        llm = LLM(dtype=args.dtype, quantization="none")
        pre = llm.engine.runner.kv_prefault
        if on and not pre.enabled:
            raise SystemExit("madvise(MADV_POPULATE_WRITE) is not available here: nothing to compare")
        pre.enabled = on
        engines[on] = llm
    ids = engines[True].get_tokenizer().encode(load_text(), add_special_tokens=False)
    requests = make_workload(args.workload, ids, args.batches * args.batch_requests, args.seed)
    for llm in engines.values():
        run_throughput(llm, [Request(requests[0].prompt[:16], 4)], warmup=False)  # untimed warm-up

    seconds = {False: [], True: []}
    system = {False: 0.0, True: 0.0}
    faults = {False: 0, True: 0}
    for b in range(args.batches):
        batch = requests[b * args.batch_requests:(b + 1) * args.batch_requests]
        for on in (False, True) if b % 2 == 0 else (True, False):
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            run_throughput(engines[on], batch, warmup=False)
            seconds[on].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            system[on] += after.ru_stime - before.ru_stime
            faults[on] += after.ru_minflt - before.ru_minflt
        print(f"batch {b + 1}: off {seconds[False][-1]:.2f} s, on {seconds[True][-1]:.2f} s, "
              f"{seconds[False][-1] / seconds[True][-1]:.3f}x", flush=True)
    pre = engines[True].engine.runner.kv_prefault
    ratios = [a / b for a, b in zip(seconds[False], seconds[True])]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(r.prompt)} for r in requests[:16]]
    tokens = {on: [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
              for on, llm in engines.items()}
    same = tokens[False] == tokens[True]
    machine = machine_info()
    total = sum(seconds[False]) / sum(seconds[True])
    print(f"{machine['cpu_model']}: {args.batches} x {args.batch_requests} {args.workload} requests, {args.dtype}: "
          f"off {sum(seconds[False]):.1f} s, on {sum(seconds[True]):.1f} s, {total:.3f}x (batches "
          f"{min(ratios):.3f}-{max(ratios):.3f}x, median {statistics.median(ratios):.3f}x); system time "
          f"{system[False]:.2f} -> {system[True]:.2f} s; minor faults {faults[False]} -> {faults[True]}; "
          f"{pre.mapped} blocks mapped in {pre.calls} calls; same tokens: {same}")
    if args.json:
        write_json({"benchmark": "kv_prefault", "machine": machine,
                    "workload": {"name": args.workload, "batches": args.batches,
                                 "batch_requests": args.batch_requests, "seed": args.seed},
                    "dtype": args.dtype, "seconds_off": seconds[False], "seconds_on": seconds[True],
                    "ratio_total": total, "ratio_median": statistics.median(ratios),
                    "system_s": {"off": system[False], "on": system[True]},
                    "minor_faults": {"off": faults[False], "on": faults[True]},
                    "blocks_mapped": pre.mapped, "populate_calls": pre.calls, "same_tokens": same}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
