"""`fuselm bench serve --capacity`: a server's capacity under an SLO it derives on the machine at hand.

A latency bound that fits one machine is meaningless on another (a 2-vCPU guest prefills a
1,000-token prompt in two seconds, a server CPU in a tenth of that), so the SLO is derived from
costs measured unloaded, before any load is applied, and written into the result with every
input: TTFT <= 2x the median unloaded TTFT of the workload's 90th-percentile prompt, TPOT <= 5x
the median unloaded TPOT of a lone decoding request (both factors are options; `--slo` gives the
bounds outright instead, which is how several engines are held to one reference engine's SLO).

Then a short burst of the workload's requests, all at once, measures the saturated request rate,
which starts the search (fuselm/bench/capacity_search.py): each probe streams a fresh seeded
sample of the workload (probe i uses seed + 1 + i, so no probe finds another's prompts in the
prefix cache) at a Poisson rate, and counts the share of requests that met the SLO. A probe stops
early once so many requests have missed the SLO that its attainment is surely below
`--capacity-stop-below` (default 0.5): an overloaded probe would otherwise drain a long queue
for nothing; its attainment is then an upper bound and the result says so.

Only the OpenAI wire format plus `ignore_eos` is used, so it runs against fuselm, `vllm serve`
and llama.cpp's `llama-server` alike (the Client of serve_client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from typing import Callable

from fuselm.bench import report
from fuselm.bench.capacity_search import Probe, derive_slo, search_capacity
from fuselm.bench.metrics import RequestRecord, compute_metrics, meets_slo, parse_slo, percentile
from fuselm.bench.serve_client import Client, _local_tokenizer, poisson_offsets, request_rows
from fuselm.bench.workloads import Request, load_text, make_workload, parse_workload_args, summarize

CALIBRATION_SEED_OFFSET = 10_007  # the unloaded probes' text windows: away from every probe's seed
BURST_SIZE = 16


def text_window(text_ids: list[int], rng: random.Random, length: int) -> list[int]:
    """`length` tokens of the text from a random offset, wrapping round to its start."""
    start = rng.randrange(len(text_ids))
    out = text_ids[start:start + length]
    while len(out) < length:
        out += text_ids[:length - len(out)]
    return out


async def measure_unloaded(client: Client, text_ids: list[int], prompt_len: int, seed: int,
                           repeats: int = 3) -> dict:
    """Unloaded costs, one request at a time: TTFT of `prompt_len`-token prompts (1 output token) and
    TPOT of a 32-token prompt decoding 32 tokens. Each prompt is a fresh text window (no cache hits);
    one untimed request of each kind runs first."""
    rng = random.Random(seed + CALIBRATION_SEED_OFFSET)
    ttfts, tpots = [], []
    for i in range(repeats + 1):
        record = await client.send(Request(text_window(text_ids, rng, prompt_len), 1))
        if not record.success:
            raise RuntimeError(f"an unloaded {prompt_len}-token request failed: {record.error}")
        if i:
            ttfts.append(record.ttft * 1000)
    for i in range(repeats + 1):
        record = await client.send(Request(text_window(text_ids, rng, 32), 32))
        if not record.success or record.tpot is None:
            raise RuntimeError(f"an unloaded decoding request failed: {record.error or 'fewer than 2 tokens'}")
        if i:
            tpots.append(record.tpot * 1000)
    return {"ttft_ms": ttfts, "tpot_ms": tpots}


async def measure_burst(client: Client, requests: list[Request]) -> dict:
    """Every request at once: the saturated request rate, which the search starts from."""
    start = time.perf_counter()
    records = await asyncio.gather(*(client.send(r) for r in requests))
    duration = time.perf_counter() - start
    failed = [r.error for r in records if not r.success]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(records)} burst requests failed, e.g.: {failed[0]}")
    return {"num_requests": len(records), "duration_s": duration, "request_rate": len(records) / duration,
            "output_tokens": sum(r.output_tokens for r in records)}


async def run_probe(client: Client, requests: list[Request], rate: float, seed: int, slo: dict[str, float],
                    target: float, stop_below: float) -> Probe:
    """Stream `requests` at a Poisson `rate`; stop once attainment is surely below `stop_below`."""
    offsets = poisson_offsets(len(requests), rate, seed)
    allowed_misses = math.floor((1 - stop_below) * len(requests))
    misses = 0
    stop = asyncio.Event()
    start = time.perf_counter()

    async def one(i: int) -> RequestRecord:
        nonlocal misses
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record = await client.send(requests[i])
        if not meets_slo(record, slo):
            misses += 1
            if misses > allowed_misses:
                stop.set()
        return record

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(requests))]
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopper, asyncio.gather(*tasks, return_exceptions=True)],
                       return_when=asyncio.FIRST_COMPLETED)
    stopped_early = stop.is_set() and not all(t.done() for t in tasks)
    for t in tasks:
        t.cancel()  # closes the streams still open: the server aborts those requests
    stopper.cancel()
    await asyncio.gather(*tasks, stopper, return_exceptions=True)
    duration = time.perf_counter() - start
    records = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
    met = sum(meets_slo(r, slo) for r in records)
    attainment = met / len(requests)  # unfinished requests count as missed: a lower bound when stopped
    details = {"seed": seed, "num_requests": len(requests), "finished": len(records), "met_slo": met,
               "stopped_early": stopped_early,
               "attainment_upper_bound": 1 - misses / len(requests) if stopped_early else attainment,
               "duration_s": duration, "metrics": compute_metrics(records, duration, slo) if records else None,
               "requests": request_rows(records, start)}
    if stopped_early:
        await asyncio.sleep(2.0)  # let the server finish aborting before the next probe
    return Probe(rate, attainment, attainment >= target, details)


async def _capacity(args: argparse.Namespace, workload_args: dict, given_slo: dict[str, float],
                    log: Callable[[str], None]) -> dict:
    client = Client(args.base_url, args.model, args.api_key, args.timeout, None)
    try:
        models = await client.resolve_model()
        corpus = load_text(args.text)
        text_ids = await client.tokenize(corpus) if args.tokenizer == "server" else _local_tokenizer(args.tokenizer)(corpus)
        workload = make_workload(args.workload, text_ids, args.num_requests, args.seed, **workload_args)
        check = await client.send(Request(workload[0].prompt[:16][::-1], 4))
        if not check.success:
            raise RuntimeError(f"the check request to {client.base_url}/v1/completions failed: {check.error}")
        p90_len = math.ceil(percentile([r.prompt_len for r in workload], 90))
        log(f"measuring unloaded costs: TTFT of {p90_len}-token prompts (the workload's p90), TPOT of one request")
        unloaded = await measure_unloaded(client, text_ids, p90_len, args.seed)
        derived = derive_slo(unloaded["ttft_ms"], unloaded["tpot_ms"], args.slo_ttft_factor, args.slo_tpot_factor,
                             p90_len)
        if given_slo:
            slo, derivation = given_slo, {"rule": "given with --slo", "source": args.slo_source or "--slo",
                                          "unloaded_here": derived["derivation"]}
        else:
            slo, derivation = derived["slo"], {**derived["derivation"], "source": f"measured on {client.base_url}"}
        log("SLO: " + ", ".join(f"{k} <= {v:.0f}" for k, v in slo.items()) + f" ({derivation['rule']})")
        start_rate = args.capacity_start_rate
        burst = None
        if start_rate is None:
            burst_requests = make_workload(args.workload, text_ids, min(BURST_SIZE, args.num_requests),
                                           args.seed + CALIBRATION_SEED_OFFSET + 1, **workload_args)
            burst = await measure_burst(client, burst_requests)
            start_rate = burst["request_rate"]
            log(f"burst of {burst['num_requests']} requests at once: {start_rate:.3g} req/s; the search starts there")
        probe_index = 0
        search_start = time.perf_counter()

        async def measure(rate: float) -> Probe | None:
            nonlocal probe_index
            expected = args.num_requests / rate  # its arrivals alone; the last requests' latency comes on top
            spent = time.perf_counter() - search_start
            if args.capacity_time_budget and spent + expected > args.capacity_time_budget:
                log(f"the next probe ({rate:.3g} req/s, >= {expected:.0f} s) would overrun --capacity-time-budget "
                    f"({spent:.0f} of {args.capacity_time_budget:g} s spent): the search ends here")
                return None
            probe_index += 1
            seed = args.seed + probe_index
            requests = make_workload(args.workload, text_ids, args.num_requests, seed, **workload_args)
            log(f"probe {probe_index}: {rate:.3g} req/s, {len(requests)} requests (seed {seed})")
            probe = await run_probe(client, requests, rate, seed, slo, args.capacity_target, args.capacity_stop_below)
            d = probe.details
            log(f"  attainment {probe.attainment:.3f}{' (stopped early)' if d['stopped_early'] else ''}"
                f" -> {'pass' if probe.passed else 'fail'} in {d['duration_s']:.0f} s")
            return probe

        search = await _async_search(measure, start_rate, args)
        return {
            "benchmark": "capacity", "machine": report.machine_info(), "base_url": client.base_url,
            "model": client.model, "server_models": models,
            "workload": {"name": args.workload, "seed": args.seed, "options": workload_args, "tokenizer": args.tokenizer,
                         "text_tokens": len(text_ids), "p90_prompt_len": p90_len, **summarize(workload)},
            "slo": slo, "slo_derivation": derivation, "burst": burst, "requests_per_probe": args.num_requests,
            "time_budget_s": args.capacity_time_budget, "search_s": time.perf_counter() - search_start,
            **search.to_dict(),
        }
    finally:
        await client.close()


async def _async_search(measure, start_rate: float, args: argparse.Namespace):
    """search_capacity drives a synchronous measure(); the probes are coroutines on this loop, so the
    search runs in a worker thread that hands each probe back to the loop and waits for it."""
    loop = asyncio.get_running_loop()

    def blocking_measure(rate: float) -> Probe | None:
        return asyncio.run_coroutine_threadsafe(measure(rate), loop).result()

    return await asyncio.to_thread(
        search_capacity, blocking_measure, start_rate, target=args.capacity_target,
        step_factor=args.capacity_step, tolerance=args.capacity_tolerance, max_probes=args.capacity_max_probes,
        max_rate=args.capacity_max_rate)


def capacity_summary(result: dict) -> str:
    rows = [("Requests per probe", result["requests_per_probe"])]
    for k, v in result["slo"].items():
        rows.append((f"SLO {k}", v))
    for p in sorted(result["probes"], key=lambda p: p["rate"]):
        mark = "<=" if p["details"]["stopped_early"] else ""
        rows.append((f"attainment @ {p['rate']:.3g} req/s", f"{mark}{p['attainment']:.3f}"))
    rows += [("Capacity (req/s)", result["capacity_rps"]), ("Lowest failing rate (req/s)", result["upper_rps"]),
             ("Converged", result["converged"])]
    return report.format_block("Capacity under the SLO", rows)


def cmd_capacity(args: argparse.Namespace) -> int:
    if args.max_concurrency is not None or args.sweep_rates:
        raise ValueError("--capacity chooses the rates itself; drop --sweep-rates and --max-concurrency")
    if not 0 < args.capacity_stop_below <= args.capacity_target:
        raise ValueError("--capacity-stop-below must be in (0, --capacity-target]")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    result = asyncio.run(_capacity(args, parse_workload_args(args.workload, args.workload_arg), parse_slo(args.slo), log))
    print(capacity_summary(result))
    path = report.write_json(result, args.json, kind=f"capacity_{args.workload}")
    print(f"wrote {path}", file=sys.stderr)
    if args.plot:
        curve = {result["model"]: result}
        print(f"wrote {report.plot_attainment(curve, args.plot, args.capacity_target)}", file=sys.stderr)
    return 0 if result["capacity_rps"] is not None else 1


def add_capacity_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("capacity under an SLO (--capacity)")
    g.add_argument("--capacity", action="store_true",
                   help="search for the highest Poisson rate at which >= --capacity-target of requests meet the SLO "
                        "(derived from unloaded costs unless --slo is given); --num-requests is per probed rate")
    g.add_argument("--capacity-target", type=float, default=0.9, help="share of requests that must meet the SLO")
    g.add_argument("--slo-ttft-factor", type=float, default=2.0,
                   help="derived SLO: TTFT <= this x the unloaded TTFT of the workload's p90 prompt")
    g.add_argument("--slo-tpot-factor", type=float, default=5.0,
                   help="derived SLO: TPOT <= this x the unloaded TPOT of one decoding request")
    g.add_argument("--slo-source", default=None, help="with --slo: where the bounds come from, recorded in the JSON")
    g.add_argument("--capacity-start-rate", type=float, default=None,
                   help="first probed rate (default: the rate of a 16-request burst sent at once)")
    g.add_argument("--capacity-step", type=float, default=1.5, help="bracketing factor between probed rates")
    g.add_argument("--capacity-tolerance", type=float, default=0.1,
                   help="stop when the lowest failing rate is within this fraction above the capacity")
    g.add_argument("--capacity-max-probes", type=int, default=7, help="at most this many probed rates")
    g.add_argument("--capacity-time-budget", type=float, default=None,
                   help="seconds the probes may take in all: a probe whose arrivals alone would overrun it is not "
                        "started, and the result keeps the bracket found so far (converged: false)")
    g.add_argument("--capacity-max-rate", type=float, default=1000.0, help="never probe above this rate")
    g.add_argument("--capacity-stop-below", type=float, default=0.5,
                   help="end a probe once its attainment is surely below this (an overloaded rate)")
