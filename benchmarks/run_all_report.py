"""The markdown report of benchmarks/run_all.py, and the README's one results table.

The report (<tag>.md) has one table per phase with each peer's ratio to fuselm. The README carries
a single, shorter table between its `results` markers: each phase's headline figure per engine,
with the machine, the date, the command and a link to the result JSON. Kept apart from run_all.py
so a saved result can be re-rendered without rerunning anything:

    .venv/bin/python benchmarks/run_all_report.py benchmarks/results/<tag>.json [--readme]

Online goodput is compared two ways, because the issue's wording admits both and they answer
different questions:
  - at the highest swept rate where vLLM keeps p99 TTFT and p99 TPOT within the SLO, the goodput
    (requests/s meeting the SLO) of every server at that same rate;
  - each server's sustainable rate: the highest swept rate at which it keeps both p99 bounds
    (DistServe's notion of goodput as a rate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from run_all_capacity import capacity_markdown, capacity_readme_rows

ROOT = Path(__file__).resolve().parents[1]
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def _f(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _ratio(ours, theirs) -> str:
    if not ours or not theirs:
        return "–"
    return f"{ours / theirs:.2f}x"


def meets_p99(run: dict, slo: dict) -> bool:
    return (run["failed"] == 0 and run.get("p99_ttft_ms") is not None and run["p99_ttft_ms"] <= slo["ttft_ms"]
            and (run.get("p99_tpot_ms") is None or run["p99_tpot_ms"] <= slo["tpot_ms"]))


def engine_label(key: str, engine: dict) -> str:
    """How an offline engine is named in the tables (vLLM with its version, HF with its batching)."""
    if key == "hf-generate":
        return f"HF `generate`, static batches of {engine.get('batch_size')}"
    if key == "hf-generate-batch":
        return "HF `generate_batch` (continuous batching, sdpa)"
    return "fuselm" if key == "fuselm" else engine.get("engine", key)


def offline_table(ph: dict) -> list[str]:
    w = ph["workload"]
    eng = ph["engines"]
    base = eng["fuselm"]["output_throughput"]
    lines = [f"**Offline throughput** — {w['num_requests']} chat-distribution requests ({w['prompt_tokens']:,} prompt + "
             f"{w['output_tokens']:,} output tokens), greedy, EOS ignored, one batch call.", "",
             "| engine | requests | time (s) | output tok/s | total tok/s | fuselm ÷ engine |", "|---|---|---|---|---|---|"]
    for key, e in eng.items():
        n = e.get("num_requests", w["num_requests"])
        lines.append(f"| {engine_label(key, e)} | {n} | {_f(e['elapsed_s'])} | {_f(e['output_throughput'])} | "
                     f"{_f(e['total_token_throughput'])} | {'1.00x' if key == 'fuselm' else _ratio(base, e['output_throughput'])} |")
    pairs = ph.get("pair_ratios") or []
    if len(pairs) > 1:
        runs = "; ".join(f"{key} {', '.join(_f(x) for x in eng[key]['runs'])}" for key in ("fuselm", "vllm"))
        lines += ["", f"fuselm and vLLM ran {len(pairs)} times each, alternating (fuselm, vLLM, vLLM, fuselm, ...); "
                      f"the table shows each one's median run. Output tok/s of every run: {runs}. fuselm ÷ vLLM within "
                      f"each adjacent pair: {', '.join(f'{r:.2f}x' for r in pairs)}."]
    return lines


def online_tables(ph: dict) -> list[str]:
    slo = ph["slo"]
    eng = ph["engines"]
    rates = [r["request_rate"] for r in next(iter(eng.values()))["runs"]]
    lines = [f"**Online serving** — chat workload, {ph['workload']['num_requests']} requests per rate, Poisson "
             f"arrivals, streamed; SLO: TTFT ≤ {slo['ttft_ms']:g} ms and TPOT ≤ {slo['tpot_ms']:g} ms. Goodput = "
             "requests/s that met both bounds.", "",
             "| server | rate (req/s) | output tok/s | goodput (req/s) | TTFT median / p99 (ms) | TPOT median / p99 (ms) "
             "| ITL p99 (ms) | failed |", "|---|---|---|---|---|---|---|---|"]
    for key, e in eng.items():
        for r in e["runs"]:
            lines.append(f"| {key} | {r['request_rate']:g} | {_f(r['output_throughput'])} | {_f(r.get('request_goodput'), 3)} | "
                         f"{_f(r['median_ttft_ms'], 0)} / {_f(r['p99_ttft_ms'], 0)} | {_f(r['median_tpot_ms'], 0)} / "
                         f"{_f(r['p99_tpot_ms'], 0)} | {_f(r['p99_itl_ms'], 0)} | {r['failed']} |")
    lines.append("")
    sustainable = {k: max([r["request_rate"] for r in e["runs"] if meets_p99(r, slo)], default=None)
                   for k, e in eng.items()}
    lines.append("| server | highest swept rate within both p99 bounds (req/s) |")
    lines.append("|---|---|")
    for k, v in sustainable.items():
        lines.append(f"| {k} | {_f(v, 2) if v is not None else 'none of ' + ', '.join(f'{x:g}' for x in rates)} |")
    if "vllm" in eng:
        ref = sustainable["vllm"]
        if ref is None:
            lines += ["", "vLLM kept p99 TTFT/TPOT within the SLO at none of the swept rates."]
        else:
            lines += ["", f"At {ref:g} req/s, the highest swept rate where vLLM keeps both p99 bounds:", "",
                      "| server | goodput (req/s) | fuselm ÷ server |", "|---|---|---|"]
            at = {k: next(r for r in e["runs"] if r["request_rate"] == ref) for k, e in eng.items()}
            g0 = at["fuselm"].get("request_goodput")
            for k, r in at.items():
                lines.append(f"| {k} | {_f(r.get('request_goodput'), 3)} | {_ratio(g0, r.get('request_goodput'))} |")
    return lines


def prefix_table(ph: dict) -> list[str]:
    on, off = ph["engines"]["fuselm caching on"], ph["engines"]["fuselm caching off"]
    return [f"**Shared prefix** — {ph['workload']['num_requests']} requests in 8 groups sharing a 1,000-token system "
            "prompt, offline.", "",
            "| fuselm | time (s) | prompt tokens computed | output tok/s | total tok/s |", "|---|---|---|---|---|",
            *(f"| prefix caching {name} | {_f(e['elapsed_s'])} | {e['computed_prompt_tokens']:,} of {e['prompt_tokens']:,} | "
              f"{_f(e['output_throughput'])} | {_f(e['total_token_throughput'])} |" for name, e in (("on", on), ("off", off))),
            "", f"Caching on ÷ off: **{_ratio(on['total_token_throughput'], off['total_token_throughput'])}** throughput."]


def long_table(ph: dict) -> list[str]:
    w = ph["workload"]
    lines = [f"**Long prompts among short ones** — {w['num_requests']} requests at {w['request_rate']:g} req/s, one in "
             "16 with a 1,000–3,000-token prompt, streamed to `fuselm serve`.", "",
             "| schedule | ITL median (ms) | ITL p99 (ms) | p99 ÷ median | ITL max (ms) | TTFT p99 (ms) | output tok/s |",
             "|---|---|---|---|---|---|---|"]
    for key, e in ph["engines"].items():
        r = e["runs"][0]
        lines.append(f"| {key} | {_f(r['median_itl_ms'], 0)} | {_f(r['p99_itl_ms'], 0)} | "
                     f"{_ratio(r['p99_itl_ms'], r['median_itl_ms'])} | {_f(r.get('max_itl_ms'), 0)} | "
                     f"{_f(r['p99_ttft_ms'], 0)} | {_f(r['output_throughput'])} |")
    return lines


def render_markdown(result: dict) -> str:
    m = result["machine"]
    head = [f"Measured by `benchmarks/run_all` on {result['date'][:10]}: {m.get('cpu_model')}, {m.get('cpu_cores')} cores, "
            f"torch {m.get('torch_version')}; model {result['model']}, {result['dtype']} for every engine. "
            "Every engine ran alone on the machine, one after another, on the same token ids.", ""]
    render = {"offline": offline_table, "online": online_tables, "capacity": capacity_markdown,
              "shared-prefix": prefix_table, "long-prompt": long_table}
    body = []
    for phase, ph in result["phases"].items():
        body += render[phase](ph) + [""]
    return "\n".join(head + body).rstrip() + "\n"




# ---- the README's one results table -------------------------------------------------------------------


def _offline_rows(ph: dict) -> list[list[str]]:
    w = ph["workload"]
    eng = ph["engines"]
    base = eng["fuselm"]["output_throughput"]
    pairs = ph.get("pair_ratios") or []
    rows = []
    for key, e in eng.items():
        result = f"{_f(e['output_throughput'])} output tok/s"
        runs = e.get("runs") or []
        if len(runs) > 1:
            result += f" (runs: {', '.join(_f(x) for x in runs)})"
        n = e.get("num_requests", w["num_requests"])
        if n != w["num_requests"]:
            result += f" (first {n} requests)"
        if key == "fuselm":
            ratio = "–"
        elif key == "vllm" and len(pairs) > 1:
            ratio = f"{', '.join(f'{r:.2f}x' for r in pairs)} (alternated pairs)"
        else:
            ratio = _ratio(base, e["output_throughput"])
        rows.append([f"offline, {w['num_requests']} chat requests", engine_label(key, e), result, ratio])
    return rows


def _online_rows(ph: dict) -> list[list[str]]:
    eng = ph["engines"]
    rates = ", ".join(f"{r['request_rate']:g}" for r in next(iter(eng.values()))["runs"])
    best = {k: max(e["runs"], key=lambda r: r.get("request_goodput") or 0.0) for k, e in eng.items()}
    g0 = best["fuselm"].get("request_goodput")
    label = f"online chat at {rates} req/s: best goodput (SLO TTFT ≤ {ph['slo']['ttft_ms']:g} ms, TPOT ≤ " \
            f"{ph['slo']['tpot_ms']:g} ms)"
    return [[label, k, f"{_f(r.get('request_goodput'), 3)} req/s at {r['request_rate']:g} req/s",
             "–" if k == "fuselm" else _ratio(g0, r.get("request_goodput"))] for k, r in best.items()]


def _prefix_rows(ph: dict) -> list[list[str]]:
    on, off = ph["engines"]["fuselm caching on"], ph["engines"]["fuselm caching off"]
    return [[f"shared prefix, {ph['workload']['num_requests']} requests", "fuselm, prefix caching on vs off",
             f"{_f(on['total_token_throughput'])} vs {_f(off['total_token_throughput'])} total tok/s",
             f"{_ratio(on['total_token_throughput'], off['total_token_throughput'])} (on ÷ off)"]]


def _long_rows(ph: dict) -> list[list[str]]:
    rows = []
    for key, e in ph["engines"].items():
        r = e["runs"][0]
        rows.append(["long prompts among short ones: p99 ÷ median ITL", key,
                     f"{_ratio(r['p99_itl_ms'], r['median_itl_ms'])} (median {_f(r['median_itl_ms'], 0)} ms, "
                     f"p99 {_f(r['p99_itl_ms'], 0)} ms)", "–"])
    return rows


def readme_table(result: dict, json_path: str, machine: str | None = None, command: str | None = None) -> str:
    """The README's results table for one run: the headline figure of each phase per engine, preceded by the
    machine, the date, the command and links to the result files (json_path relative to the repository root)."""
    m = result["machine"]
    where = machine or f"{m.get('cpu_model')}, {m.get('cpu_cores')} cores"
    command = command or result.get("command")
    md_path = json_path.removesuffix(".json") + ".md"
    head = (f"Measured on {result['date'][:10]} on {where}, torch {m.get('torch_version')}; {result['model']}, "
            f"{result['dtype']} for every engine" + (f"; command: `{command}`" if command else "") +
            f". Results: [{json_path}]({json_path}), tables: [{md_path}]({md_path}).")
    render = {"offline": _offline_rows, "online": _online_rows, "capacity": capacity_readme_rows,
              "shared-prefix": _prefix_rows, "long-prompt": _long_rows}
    lines = [head, "", "| workload | engine | result | fuselm ÷ engine |", "|---|---|---|---|"]
    for phase, ph in result["phases"].items():
        for i, row in enumerate(render[phase](ph)):
            lines.append(f"| {row[0] if i == 0 else ''} | {' | '.join(row[1:])} |")  # the workload named once
    return "\n".join(lines) + "\n"


def replace_results_table(text: str, table: str) -> str:
    """`text` with what lies between the results markers replaced by `table`; everything else kept as it is."""
    if text.count(README_START) != 1 or text.count(README_END) != 1 or text.index(README_START) > text.index(README_END):
        raise ValueError(f"the README needs exactly one {README_START} line followed by one {README_END} line")
    before, rest = text.split(README_START, 1)
    _, after = rest.split(README_END, 1)
    return f"{before}{README_START}\n{table.rstrip()}\n{README_END}{after}"


def update_readme(readme: Path, table: str) -> None:
    readme.write_text(replace_results_table(readme.read_text(), table))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Re-render a saved benchmarks/run_all.py result.")
    p.add_argument("result", type=Path, help="benchmarks/results/<tag>.json")
    p.add_argument("--readme", action="store_true", help="replace the README's results table with this result's")
    p.add_argument("--machine", default=None, help="how the README names the machine (default: the CPU model and "
                                                  "core count from the result)")
    p.add_argument("--command", default=None, help="the command the README shows (default: the one the result "
                                                  "recorded)")
    args = p.parse_args(argv)
    result = json.loads(args.result.read_text())
    print(render_markdown(result))
    if args.readme:
        path = args.result.resolve()
        shown = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        update_readme(ROOT / "README.md", readme_table(result, shown, args.machine, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
