"""Soak test (not in CI): `fuselm serve` under a steady mix of valid and hostile traffic for a long time.

The tests check each abuse once; this checks that nothing accumulates when they keep coming. It
starts `fuselm serve` on 127.0.0.1 (the embedded model unless --server-arg says otherwise, with an
API key) and for --minutes sends --rate requests a second, at most --max-in-flight at once, drawn
from a fixed mix (soak_traffic.py): chat and completions, streamed and not, n > 1, stop strings,
logprobs, next to invalid ones (bad types, NaN, lone surrogates, oversize bodies and prompts, too
many stop strings, fan-out over the limit, unknown fields, no API key, client disconnects in the
middle of a stream). Every request has a deadline and all traffic goes to 127.0.0.1 only.

It reports failures (a status other than the expected one, any 5xx, a deadline missed, a broken
response), latency percentiles of the valid requests (TTFT of the streamed ones, total time of
all), the server's RSS over the run (VmRSS from /proc/<pid>/status), whether the engine is idle
with its KV cache empty afterwards, and tracebacks in the server's log (kept in the temp folder);
and writes it all to benchmarks/results/soak-<cpu>.json.

    python benchmarks/soak.py                       # 30 minutes at 1 request/s
    python benchmarks/soak.py --minutes 2 --rate 0.5 --label epyc-2min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_traffic import API_KEY, HOST, Outcome, Traffic  # noqa: E402

from fuselm.bench.report import cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="how long to send traffic (default %(default)s)")
    p.add_argument("--rate", type=float, default=1.0,
                   help="requests started per second; keep it below what the server sustains (default %(default)s)")
    p.add_argument("--max-in-flight", type=int, default=32,
                   help="requests open at once; a tick finding this many skips its request (default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=180.0,
                   help="seconds a request may take before it counts as a hang (default %(default)s)")
    p.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for `fuselm serve` (repeatable), e.g. --server-arg=--model=PATH")
    p.add_argument("--label", default=None, help="file name part (default: the CPU model)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default results/soak-<label>.json)")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"count": len(ordered), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1], 4)}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "cpu"


class Server:
    """`fuselm serve` as a child process, its log in a file."""

    def __init__(self, port: int, extra_args: list[str], log_path: Path) -> None:
        cmd = [sys.executable, "-m", "fuselm.cli", "serve", "--host", HOST, "--port", str(port),
               "--api-key", API_KEY, "--served-model-name", "soak", "--disable-log-requests", *extra_args]
        self.log_path = log_path
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://{HOST}:{port}"

    async def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.base, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


async def sample_rss(pid: int, interval: float, samples: list[tuple[float, float]], start: float,
                     stop: asyncio.Event) -> None:
    while not stop.is_set():
        value = rss_mb(pid)
        if value is not None:
            samples.append((round(time.monotonic() - start, 1), round(value, 1)))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


async def engine_state(client: httpx.AsyncClient) -> dict[str, float]:
    """Running and waiting sequences and KV usage, from /metrics."""
    text = (await client.get("/metrics")).text
    state = {}
    for name, key in (("fuselm_num_requests_running", "running"), ("fuselm_num_requests_waiting", "waiting"),
                      ("fuselm_kv_cache_usage_ratio", "kv_usage")):
        match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
        state[key] = float(match.group(1)) if match else None
    return state


async def wait_idle(client: httpx.AsyncClient, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    state = await engine_state(client)
    while time.monotonic() < deadline and (state["running"] or state["waiting"] or state["kv_usage"]):
        await asyncio.sleep(1.0)
        state = await engine_state(client)
    return state


async def drive(args: argparse.Namespace, server: Server) -> dict:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.max_in_flight + 8, max_keepalive_connections=args.max_in_flight)
    outcomes: list[Outcome] = []
    rss: list[tuple[float, float]] = []
    skipped = 0
    async with httpx.AsyncClient(base_url=server.base, limits=limits, timeout=args.request_timeout,
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        traffic = Traffic(client, args.request_timeout)
        await traffic.prepare()
        start = time.monotonic()
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(server.proc.pid, args.rss_interval, rss, start, stop_sampling))
        in_flight: set[asyncio.Task] = set()
        end = start + args.minutes * 60
        tick = start
        while tick < end:
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
            tick += 1.0 / args.rate
            if server.proc.poll() is not None:
                break
            if len(in_flight) >= args.max_in_flight:
                skipped += 1
                continue
            task = asyncio.create_task(traffic.one(rng.random(), random.Random(rng.random())))
            in_flight.add(task)
            task.add_done_callback(lambda t: (in_flight.discard(t), outcomes.append(t.result())))
        if in_flight:
            await asyncio.wait(in_flight, timeout=args.request_timeout + 30)
        traffic_seconds = time.monotonic() - start
        idle = await wait_idle(client, 60.0) if server.proc.poll() is None else None
        health = (await client.get("/health")).status_code if server.proc.poll() is None else None
        stop_sampling.set()
        await sampler
    return {"outcomes": outcomes, "rss": rss, "skipped": skipped, "traffic_seconds": traffic_seconds,
            "idle": idle, "health_after": health}


def summarise(args: argparse.Namespace, run: dict, server: Server, exit_code: int | None) -> dict:
    outcomes: list[Outcome] = run["outcomes"]
    failures = [o for o in outcomes if not o.ok]
    by_scenario: dict[str, dict] = {}
    for o in outcomes:
        entry = by_scenario.setdefault(o.scenario, {"sent": 0, "failed": 0, "statuses": {}})
        entry["sent"] += 1
        entry["failed"] += not o.ok
        entry["statuses"][str(o.status)] = entry["statuses"].get(str(o.status), 0) + 1
    valid = [o for o in outcomes if o.valid and o.ok]
    rss = run["rss"]
    half = [mb for t, mb in rss if t >= run["traffic_seconds"] / 2]
    log = server.log_path.read_text(errors="replace")
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
        "traffic_seconds": round(run["traffic_seconds"], 1),
        "requests": len(outcomes), "skipped_at_max_in_flight": run["skipped"],
        "failures": len(failures),
        "failure_kinds": {kind: sum(1 for o in failures if o.problem_kind == kind)
                          for kind in sorted({o.problem_kind for o in failures})},
        "failure_examples": [o.as_dict() for o in failures[:40]],
        "server_5xx": sum(1 for o in outcomes if o.status is not None and o.status >= 500),
        "timeouts": sum(1 for o in outcomes if o.problem_kind == "timeout"),
        "by_scenario": dict(sorted(by_scenario.items())),
        "latency_s": {"ttft_streamed": percentiles([o.ttft_s for o in valid if o.ttft_s is not None]),
                      "total": percentiles([o.total_s for o in valid])},
        "rss_mb": {"first": rss[0][1] if rss else None, "last": rss[-1][1] if rss else None,
                   "max": max((mb for _, mb in rss), default=None),
                   "growth": round(rss[-1][1] - rss[0][1], 1) if rss else None,
                   "growth_second_half": round(half[-1] - half[0], 1) if len(half) > 1 else None,
                   "samples": rss[:: max(1, len(rss) // 120)]},
        "engine_after": run["idle"], "health_after": run["health_after"],
        "server_exit_code": exit_code,
        "server_log_tracebacks": log.count("Traceback (most recent call last)"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    label = args.label or slug(cpu_model())
    output = args.output or RESULTS / f"soak-{label}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.gettempdir()) / f"soak-{label}-server.log"
    server = Server(free_port(), args.server_arg, log_path)
    try:
        asyncio.run(server.wait_ready())
        run = asyncio.run(drive(args, server))
    finally:
        exit_code = server.stop()
    report = summarise(args, run, server, exit_code)
    output.write_text(json.dumps(report, indent=1) + "\n")
    lat = report["latency_s"]
    print(f"{report['requests']} requests in {report['traffic_seconds']} s ({report['skipped_at_max_in_flight']} "
          f"skipped at the in-flight cap); failures: {report['failures']} {report['failure_kinds']}; "
          f"5xx: {report['server_5xx']}; timeouts: {report['timeouts']}")
    print(f"valid TTFT (streamed) p50/p90/p99: {lat['ttft_streamed']['p50']}/{lat['ttft_streamed']['p90']}/"
          f"{lat['ttft_streamed']['p99']} s; total p50/p90/p99: {lat['total']['p50']}/{lat['total']['p90']}/"
          f"{lat['total']['p99']} s")
    r = report["rss_mb"]
    print(f"server RSS: {r['first']} -> {r['last']} MB (max {r['max']}, growth {r['growth']}, second half "
          f"{r['growth_second_half']}); engine after: {report['engine_after']}; tracebacks in the log: "
          f"{report['server_log_tracebacks']}")
    print(f"wrote {output}")
    return 0 if report["failures"] == 0 and report["server_log_tracebacks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
