"""`fuselm bench throughput`: offline, in-process throughput of one LLM.generate call over a workload.

The serving benchmark measures a server under load through HTTP; this one measures the engine
alone, with no network, tokenisation or scheduling of arrivals in the way: every request of a
seeded workload is handed to LLM.generate at once (greedy, ignore_eos, max_tokens = the request's
output length) and the wall time of that call gives requests/s, output tok/s and total tok/s.
The same workloads as `fuselm bench serve` are used, so offline and online figures line up.
"""

from __future__ import annotations

import argparse
import sys
import time

from fuselm.bench import report
from fuselm.bench.workloads import Request, load_text, make_workload, parse_workload_args, summarize


def run_throughput(llm, requests: list[Request], warmup: bool = True, use_tqdm: bool = False) -> dict:
    """Generate every request in one call; return the counts and rates (raises if a request came back
    with a different number of tokens than it asked for)."""
    from fuselm.sampling_params import SamplingParams

    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    if warmup:  # untimed: first-call costs (allocations, kernel selection) are not throughput
        llm.generate([requests[0].prompt[:16]] * 2, greedy.clone(max_tokens=4), use_tqdm=False)
    params = [greedy.clone(max_tokens=r.output_len) for r in requests]
    stats = llm.engine.stats
    computed_before = stats.num_prompt_tokens
    start = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start
    produced = [len(o.outputs[0].token_ids) for o in outputs]
    short = [(i, n, r.output_len) for i, (n, r) in enumerate(zip(produced, requests)) if n != r.output_len]
    if short:
        i, n, want = short[0]
        raise RuntimeError(f"{len(short)} requests came back with the wrong length, e.g. request {i}: "
                           f"{n} tokens for {want} asked")
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(produced)
    return {
        "num_requests": len(requests),
        "elapsed_s": elapsed,
        "prompt_tokens": prompt_tokens,
        "computed_prompt_tokens": stats.num_prompt_tokens - computed_before,  # prefix-cache hits excluded
        "output_tokens": output_tokens,
        "requested_output_tokens": sum(r.output_len for r in requests),
        "request_throughput": len(requests) / elapsed,
        "output_throughput": output_tokens / elapsed,
        "total_token_throughput": (prompt_tokens + output_tokens) / elapsed,
    }


def cmd_throughput(args: argparse.Namespace) -> int:
    from fuselm.cli import engine_kwargs
    from fuselm.llm import LLM

    workload_args = parse_workload_args(args.workload, args.workload_arg)
    corpus = load_text(args.text)
    options = engine_kwargs(args)
    llm = LLM(**options)
    engine = llm.engine
    print(f"model: {engine.model_name} ({engine.device}, {str(engine.dtype).removeprefix('torch.')}), "
          f"loaded in {engine.load_seconds:.2f} s", file=sys.stderr)
    text_ids = llm.get_tokenizer().encode(corpus, add_special_tokens=False)
    requests = make_workload(args.workload, text_ids, args.num_requests, args.seed, **workload_args)
    workload = {"name": args.workload, "seed": args.seed, "options": workload_args, "text_tokens": len(text_ids),
                **summarize(requests)}
    print(f"workload {args.workload}: {workload['num_requests']} requests, {workload['prompt_tokens']} prompt "
          f"tokens, {workload['output_tokens']} output tokens (ignore_eos, greedy)", file=sys.stderr, flush=True)
    results = run_throughput(llm, requests, warmup=args.warmup, use_tqdm=sys.stderr.isatty())
    print(report.format_block("Offline Throughput Result", report.throughput_rows(results)))
    data = {"benchmark": "throughput", "machine": report.machine_info(), "model": engine.model_name,
            "device": engine.device, "dtype": str(engine.dtype).removeprefix("torch."),
            "load_s": engine.load_seconds, "engine_options": options, "workload": workload, "results": results}
    path = report.write_json(data, args.json, kind=f"throughput_{args.workload}")
    print(f"wrote {path}", file=sys.stderr)
    return 0
