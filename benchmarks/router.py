"""Many instances as one service, measured on this machine (not a test): `fuselm bench serve` against
`fuselm router`, every instance in its own process pinned to its own cores with taskset.

- replicas: the shared-prefix workload (groups of requests sharing a long system prompt) over 2
  replicas of one core each, `--policy round_robin` against `--policy prefix`: throughput and TTFT.
  Each replica's KV cache is capped (--kv-cache-tokens) below what all the groups' prefixes need, so
  that where a group's requests land decides whether its prefix stays cached.
- disagg: long prompts and long outputs at a fixed request rate, against 1 colocated instance on 2
  cores, 2 colocated replicas of one core each behind the router, and 1 prefill + 1 decode instance
  (one core each) behind the router: p99 TTFT, p99 TPOT and goodput under --slo. The prefill and
  decode costs and the decode instance's KV transfer totals are recorded for docs/router.md's model.

    .venv/bin/python benchmarks/router.py replicas                  # ~2-3 minutes on a quiet 2-vCPU machine
    .venv/bin/python benchmarks/router.py disagg                    # ~4 minutes
    .venv/bin/python benchmarks/router.py transfer --input-len 2048 # the KV transports alone, ~1 minute
    .venv/bin/python benchmarks/router.py replicas --num-requests 16 --prefix-len 256   # a quick check

Results: benchmarks/results/router-<mode>-<cpu>.json, and a table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FUSELM = [sys.executable, "-c", "from fuselm.cli import main; import sys; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Started fuselm processes, each pinned with taskset; all killed on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, cores: str, args: list[str]) -> str:
        port = free_port()
        log = open(self.log_dir / f"{name}.log", "w")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.started.append(subprocess.Popen(["taskset", "-c", cores, *FUSELM, *args, "--port", str(port)],
                                             env=env, stdout=log, stderr=subprocess.STDOUT))
        return f"http://127.0.0.1:{port}"

    def wait_healthy(self, urls: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        for url in urls:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                if any(p.poll() is not None for p in self.started):
                    raise RuntimeError(f"an instance exited; see the logs in {self.log_dir}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not become healthy")
                time.sleep(0.5)

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        for p in self.started:
            p.kill()
        for p in self.started:
            p.wait(30)


def serve_args(args, threads: int, extra: list[str] = ()) -> list[str]:
    out = ["serve", "--num-threads", str(threads), "--dtype", args.dtype, "--served-model-name", "model",
           "--log-stats-interval", "60", "--disable-log-requests", *extra]
    if args.model:
        out += ["--model", args.model]
    if args.kv_cache_tokens:
        out += ["--kv-cache-memory-bytes", str(args.kv_cache_tokens * kv_bytes_per_token(args))]
    return out


def kv_bytes_per_token(args) -> int:
    """K and V of one token over all layers (SmolLM2-135M: 30 layers x 3 KV heads x 64), in --dtype."""
    layers, kv_heads, head_dim = args.kv_shape
    return 2 * layers * kv_heads * head_dim * (4 if args.dtype == "float32" else 2)


def bench(url: str, args, workload: str, workload_args: dict, rate: float, slo: dict | None = None) -> dict:
    from fuselm.bench.serve_client import run_serve_benchmark

    result = run_serve_benchmark(url, "model", workload, args.num_requests, args.seed, workload_args, [rate],
                                 args.max_concurrency, slo, (50, 99), tokenizer="server")
    return result["runs"][0]["metrics"]


def scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {f.name: sum(s.value for s in f.samples) for f in text_string_to_metric_families(text)
            if f.name.startswith(("fuselm_kv_transfer", "fuselm_prefix_cache_hit_rate", "fuselm_router_requests"))}


def run_replicas(args, log_dir: Path) -> list[dict]:
    workload_args = {"num_groups": args.num_groups, "prefix_len": args.prefix_len, "output_len": (16, 48)}
    rows = []
    for policy in args.policies.split(","):
        with Processes(log_dir) as procs:
            workers = [procs.start(f"replica{i}-{policy}", str(core), serve_args(args, 1))
                       for i, core in enumerate(args.cores.split(","))]
            router = procs.start(f"router-{policy}", args.cores, ["router", "--policy", policy,
                                                                  *sum((["--worker", w] for w in workers), [])])
            procs.wait_healthy(workers + [router])
            start = time.monotonic()
            metrics = bench(router, args, "shared-prefix", workload_args, args.request_rate)
            hit_rates = [scrape(w).get("fuselm_prefix_cache_hit_rate", 0.0) for w in workers]
            rows.append({"setup": f"2 replicas, {policy}", "wall_s": time.monotonic() - start,
                         "replica_hit_rates": hit_rates, **metrics})
    return rows


def run_disagg(args, log_dir: Path) -> list[dict]:
    cores = args.cores.split(",")
    workload_args = {"input_len": (args.input_len // 2, args.input_len), "output_len": (args.output_len // 2,
                                                                                       args.output_len)}
    slo = {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}
    rows = []
    for setup in args.setups.split(","):
        with Processes(log_dir) as procs:
            extra: dict = {}
            if setup == "colocated":
                target = procs.start("colocated", args.cores, serve_args(args, len(cores)))
                urls = [target]
            elif setup == "replicas":
                workers = [procs.start(f"replica{i}", c, serve_args(args, 1)) for i, c in enumerate(cores)]
                target = procs.start("router-replicas", args.cores, ["router", "--policy", "least_load",
                                                                     *sum((["--worker", w] for w in workers), [])])
                urls = workers + [target]
            else:
                prefill = procs.start("prefill", cores[0], serve_args(args, 1, ["--disaggregation-mode", "prefill"]))
                decode = procs.start("decode", cores[-1], serve_args(args, 1, ["--disaggregation-mode", "decode"]))
                target = procs.start("router-disagg", args.cores, ["router", "--prefill", prefill, "--decode", decode])
                urls = [prefill, decode, target]
            procs.wait_healthy(urls)
            start = time.monotonic()
            metrics = bench(target, args, "random", workload_args, args.request_rate, slo)
            if setup == "disagg":
                extra = {"decode_transfer": scrape(decode)}
            rows.append({"setup": setup, "wall_s": time.monotonic() - start, **extra, **metrics})
    return rows


def run_transfer(args, log_dir: Path) -> list[dict]:
    """The transport alone: prompts the prefill instance already caches (so it only recomputes their last
    token) moved to a decode instance over shared memory, then over the HTTP stream."""
    import random

    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1000, 20000) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    rows = []
    with Processes(log_dir) as procs:
        prefill = procs.start("transfer-prefill", args.cores.split(",")[0],
                              serve_args(args, 1, ["--disaggregation-mode", "prefill"]))
        decodes = {t: procs.start(f"transfer-decode-{t}", args.cores.split(",")[-1],
                                  serve_args(args, 1, ["--disaggregation-mode", "decode", "--kv-transfer-transport", t]))
                   for t in ("shm", "http")}
        procs.wait_healthy([prefill, *decodes.values()])
        body = {"model": "model", "max_tokens": 1}
        for prompt in prompts:  # warm the prefill instance's prefix cache
            httpx.post(prefill + "/v1/completions", json={**body, "prompt": prompt}, timeout=600).raise_for_status()
        for transport, url in decodes.items():
            for prompt in prompts:
                httpx.post(url + "/v1/completions", json={**body, "prompt": prompt}, timeout=600,
                           headers={"x-fuselm-prefill-url": prefill}).raise_for_status()
            stats = scrape(url)
            seconds, moved = stats["fuselm_kv_transfer_seconds"], stats["fuselm_kv_transfer_bytes"]
            rows.append({"setup": f"transport {transport}", "transfers": stats["fuselm_kv_transfers"],
                         "blocks": stats["fuselm_kv_transfer_blocks"], "bytes": moved, "seconds": seconds,
                         "mb_per_s": moved / seconds / 1e6, "ms_per_block": 1000 * seconds / stats["fuselm_kv_transfer_blocks"],
                         "fallbacks": stats["fuselm_kv_transfer_fallbacks"]})
    return rows


def table(rows: list[dict], goodput: bool) -> str:
    if "mb_per_s" in rows[0]:
        lines = ["| transport | transfers | blocks | MB | seconds | MB/s | ms per block |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['setup']} | {r['transfers']:.0f} | {r['blocks']:.0f} | {r['bytes'] / 1e6:.0f} | "
                  f"{r['seconds']:.2f} | {r['mb_per_s']:.0f} | {r['ms_per_block']:.2f} |" for r in rows]
        return "\n".join(lines)
    head = "| setup | output tok/s | req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms |" + (" goodput req/s |" if goodput else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['setup']} | {r['output_throughput']:.1f} | {r['request_throughput']:.2f} | "
                f"{r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} |")
        if goodput:
            line += f" {r.get('request_goodput', 0):.2f} ({r.get('good_requests', 0)}/{r['completed']}) |"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["replicas", "disagg", "transfer"])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--kv-shape", type=int, nargs=3, default=[30, 3, 64], metavar=("LAYERS", "KV_HEADS", "HEAD_DIM"),
                   help="the model's KV shape, to size --kv-cache-tokens in bytes (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cores", default="0,1", help="one core per instance, comma-separated")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--request-rate", type=float, default=None)
    g = p.add_argument_group("replicas")
    g.add_argument("--policies", default="round_robin,prefix")
    g.add_argument("--num-groups", type=int, default=4)
    g.add_argument("--prefix-len", type=int, default=512)
    g.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="each instance's KV cache in tokens (replicas default: the prefixes of num_groups/2 + 1 "
                        "groups, more than prefix routing needs and fewer than round-robin does; disagg: unset)")
    g = p.add_argument_group("disagg")
    g.add_argument("--setups", default="colocated,replicas,disagg")
    g.add_argument("--input-len", type=int, default=512, help="prompts of input_len/2 .. input_len tokens")
    g.add_argument("--output-len", type=int, default=128, help="outputs of output_len/2 .. output_len tokens")
    g.add_argument("--slo-ttft-ms", type=float, default=4000)
    g.add_argument("--slo-tpot-ms", type=float, default=150)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.mode == "replicas":
        args.num_requests = args.num_requests or 32
        args.request_rate = args.request_rate or float("inf")
        args.max_concurrency = args.max_concurrency or 8
        if args.kv_cache_tokens is None:
            args.kv_cache_tokens = (args.num_groups // 2 + 1) * args.prefix_len
    elif args.mode == "disagg":
        args.num_requests = args.num_requests or 16
        args.request_rate = args.request_rate or 0.4
    else:
        args.num_requests = args.num_requests or 4
    log_dir = Path(tempfile.mkdtemp(prefix="fuselm-router-bench-"))
    print(f"instance logs in {log_dir}", file=sys.stderr)
    rows = {"replicas": run_replicas, "disagg": run_disagg, "transfer": run_transfer}[args.mode](args, log_dir)
    from fuselm.bench.report import machine_info

    machine = machine_info()
    cpu = "-".join(str(machine.get("cpu_model") or "cpu").split(" (")[0].lower().split()[:3])
    path = Path(args.json or HERE / "results" / f"router-{args.mode}-{cpu}.json")
    path.write_text(json.dumps({"benchmark": f"router-{args.mode}", "machine": machine,
                                "options": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows},
                               indent=1, default=str))
    print(table(rows, args.mode == "disagg"))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
