"""`fuselm bench serve`: load-test any OpenAI-compatible server over HTTP and measure latency as a client sees it.

Offline throughput says nothing about what users of a server wait for: time to the first token,
the pace of the stream, and how both degrade as load rises. This client sends a seeded workload
to `/v1/completions` (prompt as token ids, max_tokens = the request's output length, ignore_eos,
temperature 0, streaming with `stream_options.include_usage`), either as a Poisson process of a
given rate or all at once, optionally capped at C requests in flight, and times every streamed
chunk on the client's monotonic clock. It uses only the OpenAI wire format plus `ignore_eos`, so
it runs against fuselm, `vllm serve` and llama.cpp's `llama-server` alike.

Token timing: an OpenAI completion chunk carries text, not a token count, and a server may pack
several tokens into one chunk (fuselm does when the reader lags, or when a token ends mid UTF-8
character). A chunk counts as carrying len(token_ids) or len(logprobs.tokens) tokens when the
server sends those, else 1 if it has text; the final chunk's usage gives the true output count,
and tokens it reports beyond those counted are taken to have arrived with the last chunk. Each
token then has an arrival time, so a chunk of k tokens yields one ITL sample equal to the gap
since the previous chunk and k - 1 samples of 0 (see metrics.token_times_from_chunks for why
this is exact for every reported statistic).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

from fuselm.bench import report
from fuselm.bench.metrics import RequestRecord, compute_metrics, parse_slo, token_times_from_chunks
from fuselm.bench.workloads import Request, load_text, make_workload, parse_workload_args, summarize


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of n requests: a Poisson process of `rate` req/s starting at 0,
    or all at 0 for an infinite rate."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (inf = all at once), got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def _tokens_in(choice: dict) -> int:
    ids = choice.get("token_ids")
    if isinstance(ids, list) and ids:
        return len(ids)
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and logprobs.get("tokens"):
        return len(logprobs["tokens"])
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return 1 if text else 0


class Client:
    """The HTTP side: one httpx.AsyncClient, the server's base URL, model and auth header."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None, timeout: float,
                 extra_body: dict | None = None) -> None:
        try:
            import httpx
        except ImportError:
            raise RuntimeError("fuselm bench serve needs httpx; install it with `pip install httpx`") from None
        self.httpx = httpx
        base = base_url.rstrip("/")
        self.base_url = base[:-3] if base.endswith("/v1") else base
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.extra_body = dict(extra_body or {})
        # No connection cap: a pool limit would queue requests inside httpx and hide that wait from TTFT.
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), trust_env=False,
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def close(self) -> None:
        await self.http.aclose()

    async def models(self) -> list[dict]:
        try:
            r = await self.http.get(f"{self.base_url}/v1/models", headers=self.headers)
        except self.httpx.HTTPError as exc:
            raise RuntimeError(f"cannot reach {self.base_url}: {type(exc).__name__}: {exc}") from None
        if r.status_code != 200:
            raise RuntimeError(f"GET {self.base_url}/v1/models answered HTTP {r.status_code}: {r.text[:300]}")
        return r.json().get("data") or []

    async def resolve_model(self) -> list[dict]:
        """The server's models; without a model given, take its first one. Returns the list."""
        models = await self.models()
        if self.model is None:
            if not models:
                raise RuntimeError(f"{self.base_url}/v1/models lists no model; pass --model")
            self.model = models[0]["id"]
        return models

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` from the server's /tokenize (fuselm and vLLM take 'prompt', llama-server 'content')."""
        bodies = ({"model": self.model, "prompt": text, "add_special_tokens": False},
                  {"content": text, "add_special": False})
        for body in bodies:
            try:
                r = await self.http.post(f"{self.base_url}/tokenize", json=body, headers=self.headers)
                tokens = r.json().get("tokens") if r.status_code == 200 else None
            except (self.httpx.HTTPError, ValueError, AttributeError):
                tokens = None
            if tokens and all(isinstance(t, int) for t in tokens):
                return tokens
        raise ValueError(f"{self.base_url}/tokenize gave no token ids; pass --tokenizer with the served model's "
                         "tokenizer (an HF model directory or a .gguf file)")

    async def send(self, req: Request) -> RequestRecord:
        """Stream one completion and time it."""
        payload = {"model": self.model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
                   "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **self.extra_body}
        record = RequestRecord(send_time=time.perf_counter(), prompt_tokens=req.prompt_len,
                               expected_output_tokens=req.output_len)
        chunks: list[tuple[float, int]] = []
        usage = None
        done = False
        try:
            async with self.http.stream("POST", f"{self.base_url}/v1/completions", json=payload,
                                        headers=self.headers) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    record.error = f"HTTP {resp.status_code}: {body[:300]}"
                else:
                    async for line in resp.aiter_lines():
                        now = time.perf_counter()
                        if not line.startswith("data:"):
                            continue  # blank separators, comments, event: lines
                        data = line[5:].strip()
                        if data == "[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if event.get("error"):
                            err = event["error"]
                            record.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                            break
                        if event.get("usage"):
                            usage = event["usage"]
                        count = sum(_tokens_in(c) for c in event.get("choices") or [])
                        if count:
                            chunks.append((now, count))
        except (self.httpx.HTTPError, ValueError) as exc:  # ValueError: a chunk that is not JSON
            record.error = f"{type(exc).__name__}: {exc}"
        if not record.error and not done:
            record.error = "the stream ended without [DONE]"
        if not record.error and not chunks:
            record.error = "the server streamed no tokens"
        counted = sum(n for _, n in chunks)
        record.output_tokens = int(usage.get("completion_tokens", counted)) if usage else counted
        if usage and usage.get("prompt_tokens") is not None:
            record.prompt_tokens = int(usage["prompt_tokens"])
        record.token_times = token_times_from_chunks(chunks, record.output_tokens)
        record.num_chunks = len(chunks)
        record.end_time = chunks[-1][0] if chunks else time.perf_counter()
        record.success = not record.error
        return record


async def run_requests(client: Client, requests: list[Request], request_rate: float = math.inf,
                       max_concurrency: int | None = None, seed: int = 0,
                       progress: bool = False) -> tuple[list[RequestRecord], float]:
    """Send every request on its Poisson schedule (at most max_concurrency at once); return the
    records (in workload order) and the benchmark duration (first send to last completion)."""
    offsets = poisson_offsets(len(requests), request_rate, seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="requests", dynamic_ncols=True)
    start = time.perf_counter()

    async def one(i: int, req: Request) -> RequestRecord:
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if gate is None:
            record = await client.send(req)
        else:
            async with gate:
                record = await client.send(req)
        if bar is not None:
            bar.update(1)
        return record

    records = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return list(records), duration


def request_rows(records: list[RequestRecord], start: float) -> list[dict]:
    """Per-request figures for the JSON file."""
    def ms(x: float | None) -> float | None:
        return None if x is None else x * 1000

    return [{"send_offset_s": r.send_time - start, "success": r.success, "error": r.error or None,
             "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
             "expected_output_tokens": r.expected_output_tokens, "num_chunks": r.num_chunks,
             "ttft_ms": ms(r.ttft), "tpot_ms": ms(r.tpot), "e2el_ms": ms(r.e2el)} for r in records]


def _local_tokenizer(spec: str) -> Callable[[str], list[int]]:
    if spec == "embedded":
        from fuselm.loader.defaults import default_model_path

        spec = default_model_path()
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        from fuselm.loader.gguf import load_gguf_tokenizer

        tok = load_gguf_tokenizer(path)
    elif path.is_dir():
        from fuselm.tokenizer import Tokenizer

        tok = Tokenizer.from_hf_dir(path)
    else:
        raise FileNotFoundError(f"--tokenizer {spec!r} is neither 'server', 'embedded', a .gguf file nor an HF directory")
    return lambda text: tok.encode(text, add_special_tokens=False)


async def _benchmark(base_url: str, model: str | None, workload: str, num_requests: int, seed: int,
                     workload_args: dict, rates: list[float], max_concurrency: int | None, slo: dict,
                     percentiles: tuple[float, ...], tokenizer: str, text: str | None, api_key: str | None,
                     timeout: float, extra_body: dict | None, progress: bool, log: Callable[[str], None]) -> dict:
    client = Client(base_url, model, api_key, timeout, extra_body)
    try:
        models = await client.resolve_model()
        corpus = load_text(text)
        text_ids = await client.tokenize(corpus) if tokenizer == "server" else _local_tokenizer(tokenizer)(corpus)
        requests = make_workload(workload, text_ids, num_requests, seed, **workload_args)
        # Untimed check (fail early, warm up); its prompt is reversed so it is no request's cached prefix.
        check = await client.send(Request(requests[0].prompt[:16][::-1], 4))
        if not check.success:
            raise RuntimeError(f"the check request to {client.base_url}/v1/completions failed: {check.error}")
        result = {
            "benchmark": "serve", "machine": report.machine_info(), "base_url": client.base_url,
            "model": client.model, "server_models": models,
            "workload": {"name": workload, "seed": seed, "options": workload_args, "tokenizer": tokenizer,
                         "text_tokens": len(text_ids), **summarize(requests)},
            "max_concurrency": max_concurrency, "slo": slo, "percentiles": list(percentiles), "runs": [],
        }
        for i, rate in enumerate(rates):
            # Run i of a sweep uses seed + i: repeating run 0's prompts would find them all in the
            # server's prefix cache and flatter every later rate.
            run_seed = seed + i
            if i:
                requests = make_workload(workload, text_ids, num_requests, run_seed, **workload_args)
            log(f"rate {rate:g} req/s, max concurrency {max_concurrency or 'unlimited'}: "
                f"{len(requests)} requests of workload {workload} (seed {run_seed})")
            records, duration = await run_requests(client, requests, rate, max_concurrency, run_seed, progress)
            metrics = compute_metrics(records, duration, slo, percentiles)
            metrics["total_expected_output_tokens"] = sum(r.output_len for r in requests)
            start = min(r.send_time for r in records)
            result["runs"].append({"request_rate": rate, "seed": run_seed, "metrics": metrics,
                                   "requests": request_rows(records, start)})
        return result
    finally:
        await client.close()


def run_serve_benchmark(base_url: str, model: str | None = None, workload: str = "random", num_requests: int = 100,
                        seed: int = 0, workload_args: dict | None = None, request_rates: list[float] | None = None,
                        max_concurrency: int | None = None, slo: dict | None = None,
                        percentiles: tuple[float, ...] = (99,), tokenizer: str = "server", text: str | None = None,
                        api_key: str | None = None, timeout: float = 600.0, extra_body: dict | None = None,
                        progress: bool = False, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run the workload once per request rate (default: one run, all at once) and return the result
    dict: machine, workload, and per run its metrics and per-request rows."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    return asyncio.run(_benchmark(base_url, model, workload, num_requests, seed, dict(workload_args or {}),
                                  list(request_rates or [math.inf]), max_concurrency, dict(slo or {}),
                                  tuple(percentiles), tokenizer, text, api_key, timeout, extra_body, progress, log))


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers (inf allowed), got {text!r}") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def cmd_serve(args: argparse.Namespace) -> int:
    if args.capacity:
        from fuselm.bench.capacity import cmd_capacity

        return cmd_capacity(args)
    rates = _floats(args.sweep_rates, "--sweep-rates") if args.sweep_rates else [args.request_rate]
    percentiles = tuple(sorted(set(_floats(args.percentiles, "--percentiles")) | {99.0}))  # sweeps plot p99
    extra = json.loads(args.extra_body) if args.extra_body else None
    result = run_serve_benchmark(
        args.base_url, args.model, args.workload, args.num_requests, args.seed,
        parse_workload_args(args.workload, args.workload_arg), rates, args.max_concurrency, parse_slo(args.slo),
        percentiles, args.tokenizer, args.text, args.api_key, args.timeout, extra, sys.stderr.isatty(),
        lambda s: print(s, file=sys.stderr, flush=True))
    for run in result["runs"]:
        title = "Serving Benchmark Result" + (f" @ {run['request_rate']:g} req/s" if len(rates) > 1 else "")
        print(report.format_block(title, report.serve_rows(run["metrics"], percentiles)))
        m = run["metrics"]
        if m["failed"] == 0 and m["total_output_tokens"] != m["total_expected_output_tokens"]:
            print(f"warning: the server generated {m['total_output_tokens']} tokens where the workload asked for "
                  f"{m['total_expected_output_tokens']} (does it honour ignore_eos?)", file=sys.stderr)
    if len(result["runs"]) > 1:
        print(report.sweep_table(result["runs"]))
    path = report.write_json(result, args.json, kind=f"serve_{args.workload}")
    print(f"wrote {path}", file=sys.stderr)
    if args.plot:
        title = f"{result['model']} - {args.workload}, {args.num_requests} requests"
        print(f"wrote {report.plot_sweep(result['runs'], args.plot, title)}", file=sys.stderr)
    return 1 if any(run["metrics"]["failed"] for run in result["runs"]) else 0


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (with or without /v1)")
    g.add_argument("--model", default=None, help="model name to send (default: the first one /v1/models lists)")
    g.add_argument("--api-key", default=os.environ.get("FUSELM_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $FUSELM_API_KEY, else none)")
    g.add_argument("--tokenizer", default="server",
                   help="how prompts are tokenised: 'server' (its /tokenize endpoint), 'embedded' (fuselm's "
                        "SmolLM2), or an HF model directory / .gguf file of the served model")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    g.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean requests per second, Poisson arrivals (seeded by --seed); inf = all at once")
    g.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    g.add_argument("--sweep-rates", default=None, help="comma-separated rates, e.g. 1,2,4,inf: one run per rate "
                                                        "(replaces --request-rate)")
    g = p.add_argument_group("output")
    g.add_argument("--slo", default=None, help="goodput bounds in ms, e.g. ttft_ms=500,tpot_ms=50 (keys: ttft_ms, "
                                               "tpot_ms, e2el_ms); goodput = requests/s meeting every bound")
    g.add_argument("--percentiles", default="99", help="comma-separated percentiles to report besides the median")
    g.add_argument("--json", default=None, help="result file (default: benchmarks/results/serve_<workload>_<time>.json)")
    g.add_argument("--plot", default=None, help="PNG of TTFT and TPOT p50/p99 against request rate (with --sweep-rates), "
                                                "or of SLO attainment against rate (with --capacity)")
    from fuselm.bench.capacity import add_capacity_args

    add_capacity_args(p)
