"""The markdown report of benchmarks/run_all.py: one table per phase, each peer's ratio to fuselm.

Kept apart from run_all.py so a saved result JSON can be re-rendered without rerunning anything:

    .venv/bin/python benchmarks/run_all_report.py benchmarks/results/<tag>.json [--readme]

Online goodput is compared two ways, because the issue's wording admits both and they answer
different questions:
  - at the highest swept rate where vLLM keeps p99 TTFT and p99 TPOT within the SLO, the goodput
    (requests/s meeting the SLO) of every server at that same rate;
  - each server's sustainable rate: the highest swept rate at which it keeps both p99 bounds
    (DistServe's notion of goodput as a rate).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

README_START = "<!-- run_all:start -->"
README_END = "<!-- run_all:end -->"


def _f(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _ratio(ours, theirs) -> str:
    if not ours or not theirs:
        return "–"
    return f"{ours / theirs:.2f}x"


def meets_p99(run: dict, slo: dict) -> bool:
    return (run["failed"] == 0 and run.get("p99_ttft_ms") is not None and run["p99_ttft_ms"] <= slo["ttft_ms"]
            and (run.get("p99_tpot_ms") is None or run["p99_tpot_ms"] <= slo["tpot_ms"]))


def offline_table(ph: dict) -> list[str]:
    w = ph["workload"]
    eng = ph["engines"]
    base = eng["fuselm"]["output_throughput"]
    lines = [f"**Offline throughput** — {w['num_requests']} chat-distribution requests ({w['prompt_tokens']:,} prompt + "
             f"{w['output_tokens']:,} output tokens), greedy, EOS ignored, one batch call.", "",
             "| engine | requests | time (s) | output tok/s | total tok/s | fuselm ÷ engine |", "|---|---|---|---|---|---|"]
    names = {"fuselm": "fuselm", "vllm": None, "hf-generate": "HF `generate`, static batches of {bs}",
             "hf-generate-batch": "HF `generate_batch` (continuous batching, sdpa)"}
    for key, e in eng.items():
        label = names.get(key) or e.get("engine", key)
        label = label.format(bs=e.get("batch_size"))
        n = e.get("num_requests", w["num_requests"])
        lines.append(f"| {label} | {n} | {_f(e['elapsed_s'])} | {_f(e['output_throughput'])} | "
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
    render = {"offline": offline_table, "online": online_tables, "shared-prefix": prefix_table, "long-prompt": long_table}
    body = []
    for phase, ph in result["phases"].items():
        body += render[phase](ph) + [""]
    return "\n".join(head + body).rstrip() + "\n"


def update_readme(readme: Path, md: str) -> None:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        print(f"{readme} has no {README_START} / {README_END} markers; table not inserted", file=sys.stderr)
        return
    pre, rest = text.split(README_START, 1)
    _, post = rest.split(README_END, 1)
    readme.write_text(f"{pre}{README_START}\n{md}{README_END}{post}")


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    out = render_markdown(data)
    print(out)
    if "--readme" in sys.argv[2:]:
        update_readme(Path(__file__).resolve().parents[1] / "README.md", out)
