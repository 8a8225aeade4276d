"""Time to first token of a well-behaved client while an abusive client floods the server.

For each engine setting this starts `fuselm serve` (a separate process) on the tiny test Llama,
measures the well-behaved client's streamed 2-token completions one after another unloaded, then
again while an abusive client (another process) keeps `--flood` non-streaming 128-token
completions in flight, and reports TTFT p50/p99 both ways, their ratio and the abuser's
throughput. `--same-client` sends both clients as one identity (no X-Client-Id): the scheduler then
orders by arrival alone, as it did before per-client fair admission. docs/server.md has the
figures; other processes on the cores move them by about 2x, so the load average is recorded.

    .venv/bin/python benchmarks/fairness.py --setting "--max-num-seqs 16" \
        --setting "--max-num-seqs 16 --max-num-seqs-per-client 8" --requests 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox jumps over the lazy dog"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, setting: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from fuselm.cli import main; sys.exit(main())", "serve",
           "--model", model, "--port", str(port), "--dtype", "float32", "--device", "cpu", "--disable-log-requests",
           *shlex.split(setting)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, f"server exited: {' '.join(cmd)}"
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def ttfts(base_url: str, count: int, client_id: str | None) -> list[float]:
    """Seconds to the first token of `count` streamed 2-token completions, one after another."""
    headers = {"X-Client-Id": client_id} if client_id else {}
    body = {"prompt": PROMPT, "max_tokens": 2, "ignore_eos": True, "stream": True}
    out = []
    with httpx.Client(base_url=base_url, timeout=300, headers=headers) as c:
        for _ in range(count):
            t0 = time.perf_counter()
            first = None
            with c.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.perf_counter() - t0
            out.append(first)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def scrape(base_url: str) -> dict[str, float]:
    """Running and waiting sequences and generated tokens (of finished requests) from /metrics."""
    found = {}
    for line in httpx.get(base_url + "/metrics", timeout=30).text.splitlines():
        for name in ("fuselm_num_requests_running", "fuselm_num_requests_waiting", "fuselm_generation_tokens_total"):
            if line.startswith(name + "{"):
                found[name.removeprefix("fuselm_")] = float(line.rsplit(" ", 1)[1])
    return found


def per_client_cap(setting: str) -> int | None:
    words = shlex.split(setting)
    return int(words[words.index("--max-num-seqs-per-client") + 1]) if "--max-num-seqs-per-client" in words else None


def measure(model: str, setting: str, requests: int, flood: int, same_client: bool, min_seconds: float) -> dict:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = start_server(model, port, setting)
    abuser = None
    try:
        ttfts(base_url, 5, "wb")  # warm-up
        unloaded = ttfts(base_url, requests, None if same_client else "wb")
        abuser = subprocess.Popen([sys.executable, __file__, "--abuse", base_url, "--flood", str(flood),
                                   *(["--same-client"] if same_client else [])], stdout=subprocess.PIPE, text=True)
        # Warm up: the flood fills the engine, and with a per-client cap the well-behaved client's
        # presence holds the flood's running sequences down to the cap as its earlier ones finish.
        cap = per_client_cap(setting)
        warm_start = time.perf_counter()
        while True:
            ttfts(base_url, 3, None if same_client else "wb")
            state = scrape(base_url)
            waited = time.perf_counter() - warm_start
            flood_arrived = state["num_requests_running"] + state["num_requests_waiting"] > 1
            settled = cap is None or state["num_requests_running"] <= cap + 1
            if waited > 3 and flood_arrived and (settled or waited > 90):
                break
        t0 = time.time()
        flooded = []
        while len(flooded) < requests or time.time() - t0 < min_seconds:  # long enough to see the flood's turnover
            flooded += ttfts(base_url, 10, None if same_client else "wb")
        t1 = time.time()
        end_state = scrape(base_url)
        abuser.terminate()
        finished = [json.loads(line) for line in abuser.communicate(timeout=60)[0].splitlines()]
    finally:
        if abuser is not None and abuser.poll() is None:
            abuser.kill()
        server.terminate()
        server.wait(30)
    row = {"setting": setting or "(defaults)", "same_client": same_client,
           "unloaded_p50_ms": 1e3 * statistics.median(unloaded), "unloaded_p99_ms": 1e3 * percentile(unloaded, 0.99),
           "flooded_p50_ms": 1e3 * statistics.median(flooded), "flooded_p99_ms": 1e3 * percentile(flooded, 0.99),
           "running_waiting_under_flood": [state["num_requests_running"], state["num_requests_waiting"]],
           "running_waiting_at_end": [end_state["num_requests_running"], end_state["num_requests_waiting"]],
           "warm_up_seconds": round(waited, 1), "flood_seconds": t1 - t0, "flooded_requests": len(flooded),
           "abuser_tokens_per_s": sum(tokens for when, tokens in finished if t0 <= when <= t1) / (t1 - t0)}
    row["p99_ratio"] = row["flooded_p99_ms"] / row["unloaded_p99_ms"]
    return row


def abuse(base_url: str, flood: int, same_client: bool) -> None:
    """Keep `flood` non-streaming 128-token completions in flight until terminated; print when each finished."""
    import asyncio
    import signal

    headers = {} if same_client else {"X-Client-Id": "abuser"}
    body = {"prompt": PROMPT, "max_tokens": 128, "ignore_eos": True}

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            r = await client.post("/v1/completions", json=body)
            print(json.dumps([time.time(), r.json()["usage"]["completion_tokens"]]), flush=True)  # when, tokens

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        limits = httpx.Limits(max_connections=flood)
        async with httpx.AsyncClient(base_url=base_url, timeout=600, headers=headers, limits=limits) as client:
            tasks = [asyncio.create_task(worker(client)) for _ in range(flood)]
            await stop.wait()
            for t in tasks:
                t.cancel()

    asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model path (default: the tiny test Llama, built in a temporary folder)")
    ap.add_argument("--setting", action="append", help="serve flags of one engine setting (repeatable)")
    ap.add_argument("--requests", type=int, default=100, help="well-behaved requests per measurement")
    ap.add_argument("--flood", type=int, default=64, help="the abuser's requests in flight")
    ap.add_argument("--min-seconds", type=float, default=30.0,
                    help="shortest flooded measurement (the abuser's throughput counts requests finished in it)")
    ap.add_argument("--same-client", action="store_true", help="both clients as one identity (arrival order)")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--abuse", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.abuse:
        abuse(args.abuse, args.flood, args.same_client)
        return 0
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import make_tiny_model

        model = str(Path(tempfile.mkdtemp()) / "tiny-llama")
        make_tiny_model(Path(model), "llama")
    rows = []
    for setting in args.setting or [""]:
        load = os.getloadavg()
        row = measure(model, setting, args.requests, args.flood, args.same_client, args.min_seconds)
        row["load_average_before_after"] = [load[0], os.getloadavg()[0]]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
