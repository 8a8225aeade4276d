"""`fuselm bench throughput` and `fuselm bench serve`: the benchmark subcommands.

fuselm/cli.py finds this module and calls register(subparsers). Arguments only live here; the
work is done in fuselm/bench/throughput.py (offline, in-process) and serve_client.py (HTTP).
See docs/benchmarks.md for how to run them and what every reported field means.
"""

from __future__ import annotations

import argparse
import textwrap


def add_workload_args(p: argparse.ArgumentParser, default_requests: int, with_seed: bool = True) -> None:
    """Workload options; with_seed=False where the engine options already define --seed (it seeds both)."""
    from fuselm.bench.workloads import WORKLOADS

    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=list(WORKLOADS), default="random",
                   help="request mix (see 'workload options' below)")
    g.add_argument("--num-requests", type=int, default=default_requests, help="requests in the workload")
    if with_seed:
        g.add_argument("--seed", type=int, default=0, help="seed of the workload (lengths, text offsets, arrivals)")
    g.add_argument("--workload-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="set a workload option (repeatable); ranges are MIN:MAX, e.g. input_len=64:256")
    g.add_argument("--text", default=None, help="plain-text file the prompts are cut from "
                                                "(default: benchmarks/data/public_domain_prose.txt)")


def _epilog() -> str:
    from fuselm.bench.workloads import describe_workloads

    return "workload options (KEY=DEFAULT, set with --workload-arg KEY=VALUE):\n" + "\n".join(
        "  " + line for line in describe_workloads().splitlines())


def register(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="benchmarks: offline throughput, or a load test of an OpenAI-compatible server",
        description="Benchmarks with seeded workloads cut from real text. 'throughput' runs the engine "
                    "in-process; 'serve' load-tests a running server (fuselm serve, vllm serve, llama-server).")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="{throughput,serve}")
    raw = argparse.RawDescriptionHelpFormatter  # keeps the epilog's one-line-per-workload layout

    tp = sub.add_parser(
        "throughput", help="offline throughput: one LLM.generate call over the whole workload",
        description=textwrap.fill("Load the model, hand every request of the workload to LLM.generate at once (greedy, "
                    "ignore_eos, max_tokens = each request's output length) and report requests/s, output "
                    "tok/s and total tok/s. Writes a JSON result file. --seed (an engine option) "
                    "also seeds the workload.", 100),
        epilog=_epilog(), formatter_class=raw)
    add_workload_args(tp, default_requests=256, with_seed=False)
    g = tp.add_argument_group("output")
    g.add_argument("--json", default=None, help="result file (default: benchmarks/results/throughput_<workload>_<time>.json)")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="run one tiny untimed batch first")
    from fuselm.cli import add_engine_args

    add_engine_args(tp)
    tp.set_defaults(func=_throughput)

    sv = sub.add_parser(
        "serve", help="load-test an OpenAI-compatible server: TTFT, TPOT, ITL, latency, goodput",
        description=textwrap.fill("Stream /v1/completions requests (token-id prompts, ignore_eos, temperature 0) to a running "
                    "server, at a Poisson request rate and/or a concurrency cap, and report vLLM-style serving "
                    "metrics. --sweep-rates runs one benchmark per rate; --plot draws latency against rate. --capacity "
                    "searches for the highest rate at which 90% of requests meet an SLO derived from unloaded costs.", 100),
        epilog=_epilog(), formatter_class=raw)
    add_workload_args(sv, default_requests=200)
    from fuselm.bench.serve_client import add_serve_args

    add_serve_args(sv)
    sv.set_defaults(func=_serve)


def _report_errors(command, args: argparse.Namespace) -> int:
    """RuntimeErrors (server unreachable, missing optional package, wrong token counts) end the
    command with a one-line message, as fuselm's main does for ValueError."""
    import sys

    try:
        return command(args)
    except RuntimeError as exc:
        print(f"fuselm bench: error: {exc}", file=sys.stderr)
        return 1


def _throughput(args: argparse.Namespace) -> int:
    from fuselm.bench.throughput import cmd_throughput

    return _report_errors(cmd_throughput, args)


def _serve(args: argparse.Namespace) -> int:
    from fuselm.bench.serve_client import cmd_serve

    return _report_errors(cmd_serve, args)
