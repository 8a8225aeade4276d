"""Benchmark output: the printed result block, the JSON file, machine info and the rate-sweep plot.

One place for presentation so `fuselm bench throughput` and `fuselm bench serve` print the same
kind of block (a titled list of `key: value` lines, as vLLM's bench does) and write JSON files
that carry what is needed to judge a number later: the machine, library versions and the date.
"""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WIDTH = 50


def cpu_model() -> str:
    from fuselm.kernels.build import cpu_model_name

    return cpu_model_name()


def machine_info() -> dict:
    """Where the numbers were taken: CPU, cores, GPU (if torch sees one), versions, date."""
    import torch

    info = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    try:
        from importlib.metadata import version

        info["fuselm_version"] = version("fuselm")
    except Exception:
        pass
    return info


# ---- the printed block ----------------------------------------------------------------------------


def _value(v: object) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def format_block(title: str, rows: list[tuple[str, object] | str]) -> str:
    """A '=== title ===' block of 'label: value' lines; a plain string row is a '---' subheading."""
    lines = [f" {title} ".center(WIDTH, "=")]
    for row in rows:
        if isinstance(row, str):
            lines.append(f" {row} ".center(WIDTH, "-"))
        else:
            label, value = row
            lines.append(f"{label + ':':<40}{_value(value):>10}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


_SECTIONS = (("ttft", "Time to First Token", "TTFT"), ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
             ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL"))


def serve_rows(m: dict, percentiles: tuple[float, ...] = (99,)) -> list:
    rows: list = [
        ("Successful requests", m["completed"]),
        ("Failed requests", m["failed"]),
        ("Benchmark duration (s)", m["duration_s"]),
        ("Total input tokens", m["total_input_tokens"]),
        ("Total generated tokens", m["total_output_tokens"]),
        ("Request throughput (req/s)", m["request_throughput"]),
    ]
    if "request_goodput" in m:
        rows.append(("Request goodput (req/s)", m["request_goodput"]))
    rows += [("Output token throughput (tok/s)", m["output_throughput"]),
             ("Total token throughput (tok/s)", m["total_token_throughput"])]
    for key, heading, short in _SECTIONS:
        rows.append(heading)
        rows.append((f"Mean {short} (ms)", m[f"mean_{key}_ms"]))
        rows.append((f"Median {short} (ms)", m[f"median_{key}_ms"]))
        for p in percentiles:
            rows.append((f"P{p:g} {short} (ms)", m[f"p{p:g}_{key}_ms"]))
    return rows


def throughput_rows(r: dict) -> list:
    return [
        ("Requests", r["num_requests"]),
        ("Elapsed time (s)", r["elapsed_s"]),
        ("Total input tokens", r["prompt_tokens"]),
        ("Total generated tokens", r["output_tokens"]),
        ("Request throughput (req/s)", r["request_throughput"]),
        ("Output token throughput (tok/s)", r["output_throughput"]),
        ("Total token throughput (tok/s)", r["total_token_throughput"]),
    ]


def sweep_table(runs: list[dict]) -> str:
    """One line per request rate of a sweep."""
    head = f"{'rate (req/s)':>12}{'req/s':>9}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}"
    lines = [head, "-" * len(head)]
    for run in runs:
        m = run["metrics"]
        lines.append(f"{run['request_rate']:>12g}{m['request_throughput']:>9.2f}{m['output_throughput']:>11.1f}"
                     + "".join(f"{_value(m[k]):>10}" for k in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
                                                               "p99_tpot_ms")))
    return "\n".join(lines)


# ---- files ----------------------------------------------------------------------------------------


def default_results_dir() -> Path:
    """benchmarks/results of the source tree when there is one, else ./benchmarks/results."""
    repo = REPO_ROOT / "benchmarks"
    return (repo if repo.is_dir() else Path.cwd() / "benchmarks") / "results"


def jsonable(value: object) -> object:
    """`value` with non-finite floats (an infinite request rate) as the strings 'inf' / 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(data: dict, path: str | Path | None = None, kind: str = "bench") -> Path:
    """Write `data` to `path`, or to benchmarks/results/<kind>_<date-time>.json; return the path."""
    if path is None:
        path = default_results_dir() / f"{kind}_{datetime.now():%Y%m%d-%H%M%S}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2, default=str, allow_nan=False) + "\n")
    return path


def plot_sweep(runs: list[dict], path: str | Path, title: str = "") -> Path:
    """TTFT and TPOT (p50 and p99, ms) against request rate, side by side, into a PNG.

    An infinite rate (everything sent at once) is drawn at the right edge, labelled 'inf'.
    """
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib; install it with `pip install matplotlib`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["request_rate"] for r in runs if r["request_rate"] != float("inf")]
    inf_x = (max(finite) * 1.5 if finite else 1.0)
    xs = [r["request_rate"] if r["request_rate"] != float("inf") else inf_x for r in runs]
    order = sorted(range(len(runs)), key=lambda i: xs[i])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ys = [runs[i]["metrics"][f"{stat}_{key}_ms"] for i in order]
            pts = [(xs[i], y) for i, y in zip(order, ys) if y is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{name} {'p50' if stat == 'median' else stat}")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} vs request rate")
        ax.grid(True, alpha=0.3)
        ax.legend()
        if len(finite) < len(runs):
            ticks = sorted(set(finite)) + [inf_x]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["inf"])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attainment(curves: dict[str, dict], path: str | Path, target: float = 0.9, title: str = "") -> Path:
    """SLO attainment against request rate, one line per engine, from capacity results (`fuselm bench
    serve --capacity` JSON). A probe that stopped early is drawn hollow at its upper bound; each
    engine's capacity is marked on the target line."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib; install it with `pip install matplotlib`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, result in curves.items():
        probes = sorted(result["probes"], key=lambda p: p["rate"])
        ys = [p["details"]["attainment_upper_bound"] if p["details"].get("stopped_early") else p["attainment"]
              for p in probes]
        (line,) = ax.plot([p["rate"] for p in probes], ys, "-", label=label)
        for p, y in zip(probes, ys):
            ax.plot(p["rate"], y, "o", color=line.get_color(),
                    fillstyle="none" if p["details"].get("stopped_early") else "full")
        if result.get("capacity_rps") is not None:
            ax.plot(result["capacity_rps"], target, "*", markersize=14, color=line.get_color())
    ax.axhline(target, linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("request rate (req/s, Poisson)")
    ax.set_ylabel("share of requests meeting the SLO")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or f"SLO attainment vs rate (star: capacity at {target:.0%}; hollow: upper bound)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
