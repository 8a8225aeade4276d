"""Offline throughput: fuselm's one-call batch generate vs HF transformers' batched generate.

The question is how many tokens per second fuselm gets through a realistic offline batch
compared with the obvious alternative on the same machine: HF `generate` with left padding in
fixed batches. Both run SmolLM2-135M-Instruct with identical weights (the embedded GGUF,
dequantised by fuselm's loader and exported as an HF directory), the same dtype, the same
thread count and greedy decoding. Prompts are real text (cut at random offsets from
benchmarks/data/public_domain_prose.txt) and every request decodes exactly its own target length.

    python benchmarks/offline_throughput.py --dtype bfloat16            # 256 requests, both engines
    python benchmarks/offline_throughput.py --num-requests 32 --skip-hf # quick fuselm-only run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_TEXT = HERE / "data" / "public_domain_prose.txt"
PROMPT_RANGE = (32, 512)
OUTPUT_RANGE = (32, 256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of the workload (lengths and offsets)")
    p.add_argument("--skip-hf", action="store_true", help="run fuselm only")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for both engines (default: all cores)")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="plain-text file the prompts are cut from")
    p.add_argument("--hf-dir", type=Path, default=None, help="where to export the HF copy (default: ~/.cache/fuselm/hf_export/...)")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fuselm engine option, e.g. max_num_seqs=128 (repeatable)")
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.hf_batch_size < 1 or args.threads < 1:
        p.error("--num-requests, --hf-batch-size and --threads must be >= 1")
    return args


def engine_options(pairs: list[str]) -> dict:
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--engine-option needs KEY=VALUE, got {pair!r}")
        try:
            opts[key] = json.loads(value)
        except ValueError:
            opts[key] = value  # a plain string
    return opts


def make_workload(text_ids: list[int], n: int, seed: int) -> list[tuple[list[int], int]]:
    """n (prompt token ids, output length) pairs; the prompt is a random window of the text."""
    if len(text_ids) < PROMPT_RANGE[1]:
        raise SystemExit(f"the text has only {len(text_ids)} tokens; it needs at least {PROMPT_RANGE[1]}")
    rng = random.Random(seed)
    work = []
    for _ in range(n):
        plen = rng.randint(*PROMPT_RANGE)
        olen = rng.randint(*OUTPUT_RANGE)
        start = rng.randint(0, len(text_ids) - plen)
        work.append((text_ids[start:start + plen], olen))
    return work


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Share of all cores busy (any process) over `seconds`, from /proc/stat; None off Linux."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except OSError:
        return None
    return round(1.0 - (i1 - i0) / max(t1 - t0, 1), 3)


class OtherLoad:
    """CPU used by OTHER processes while a timed section runs, in cores (0 = the machine was ours).

    System-wide busy time from /proc/stat minus this process's own CPU time, over the wall time.
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy(self) -> float | None:
        try:
            with open("/proc/stat") as fh:
                fields = [int(x) for x in fh.readline().split()[1:]]
        except OSError:
            return None
        return (sum(fields[:8]) - fields[3] - fields[4]) / self.tick  # all but idle and iowait; no guest

    def __enter__(self) -> "OtherLoad":
        self.cores = None
        self.t0, self.cpu0, self.busy0 = time.perf_counter(), time.process_time(), self._busy()
        return self

    def __exit__(self, *exc) -> None:
        busy1, wall = self._busy(), time.perf_counter() - self.t0
        if busy1 is not None and self.busy0 is not None and wall > 0:
            own = time.process_time() - self.cpu0
            self.cores = round(max(busy1 - self.busy0 - own, 0.0) / wall, 2)


def system_info(threads: int) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_version": torch.__version__,
            "torch_threads": threads, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import transformers
        info["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    return info


def run_fuselm(work, dtype: str, threads: int, seed: int, extra: dict) -> dict:
    from fuselm import LLM, SamplingParams

    t0 = time.perf_counter()
    # the peers run the dequantised weights: so does fuselm (not the GGUF's own Q4_1)
    llm = LLM(dtype=dtype, num_threads=threads, seed=seed, quantization="none", **extra)
    load_s = time.perf_counter() - t0
    torch.set_num_threads(threads)
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    llm.generate([work[0][0][:16]] * 2, greedy.clone(max_tokens=4), use_tqdm=False)  # warm-up, untimed
    params = [greedy.clone(max_tokens=olen, min_tokens=olen) for _, olen in work]
    with OtherLoad() as other:
        t0 = time.perf_counter()
        outs = llm.generate([p for p, _ in work], params, use_tqdm=sys.stderr.isatty())
        seconds = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    for (_, olen), toks in zip(work, tokens):
        if len(toks) != olen:
            raise RuntimeError(f"fuselm returned {len(toks)} tokens for a request that asked for {olen}")
    del llm
    gc.collect()
    return {"seconds": seconds, "load_seconds": load_s, "output_tokens": sum(len(t) for t in tokens),
            "generated_tokens": sum(len(t) for t in tokens), "other_processes_cpu_cores": other.cores,
            "tokens": tokens}


def run_hf(work, dtype: str, threads: int, batch_size: int, hf_dir: Path | None) -> dict:
    from transformers import AutoModelForCausalLM

    from fuselm.bench.hf_export import default_export_dir, export_hf_dir

    t0 = time.perf_counter()
    path = export_hf_dir(hf_dir or default_export_dir(dtype), dtype)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - t0
    torch.set_num_threads(threads)
    cfg = json.loads((path / "config.json").read_text())
    pad = cfg.get("pad_token_id")
    if pad is None:
        eos = cfg.get("eos_token_id")
        pad = eos[0] if isinstance(eos, list) else (eos or 0)

    def generate(batch: list[tuple[list[int], int]]) -> tuple[list[list[int]], int]:
        width = max(len(p) for p, _ in batch)
        new = max(olen for _, olen in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (prompt, _) in enumerate(batch):  # left padding
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
        # Each row decodes `new` tokens; only its own target length counts as useful output.
        return [out[row, width:width + olen].tolist() for row, (_, olen) in enumerate(batch)], len(batch) * new

    generate([(work[0][0][:16], 4)] * 2)  # warm-up, untimed
    tokens: list[list[int]] = []
    computed = 0
    with OtherLoad() as other:
        t0 = time.perf_counter()
        for start in range(0, len(work), batch_size):
            toks, n = generate(work[start:start + batch_size])
            tokens += toks
            computed += n
        seconds = time.perf_counter() - t0
    del model
    gc.collect()
    return {"seconds": seconds, "load_seconds": load_s, "export_seconds": export_s, "hf_dir": str(path),
            "output_tokens": sum(len(t) for t in tokens), "generated_tokens": computed,
            "other_processes_cpu_cores": other.cores, "tokens": tokens}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far the two engines' greedy outputs agree (identical weights; dtype noise and padding can split them)."""
    prefixes = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefixes.append(n)
    return {"identical_requests": sum(x == y for x, y in zip(a, b)), "requests": len(prefixes),
            "mean_common_prefix_tokens": round(sum(prefixes) / max(len(prefixes), 1), 1)}


def print_table(rows: list[tuple[str, dict]], prompt_tokens: int, n: int) -> None:
    head = f"{'engine':<22}{'requests':>9}{'prompt tok':>12}{'output tok':>12}{'seconds':>10}{'out tok/s':>11}{'total tok/s':>13}"
    print(head)
    print("-" * len(head))
    for name, r in rows:
        print(f"{name:<22}{n:>9}{prompt_tokens:>12}{r['output_tokens']:>12}{r['seconds']:>10.1f}"
              f"{r['output_tok_per_s']:>11.1f}{r['total_tok_per_s']:>13.1f}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    extra = engine_options(args.engine_option)
    from fuselm.loader.defaults import default_model_path
    from fuselm.loader.gguf import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(default_model_path())
    text_ids = tokenizer.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=False)
    work = make_workload(text_ids, args.num_requests, args.seed)
    prompt_tokens = sum(len(p) for p, _ in work)
    target_tokens = sum(o for _, o in work)
    print(f"workload: {len(work)} requests, {prompt_tokens} prompt tokens (uniform {PROMPT_RANGE[0]}..{PROMPT_RANGE[1]}), "
          f"{target_tokens} output tokens (uniform {OUTPUT_RANGE[0]}..{OUTPUT_RANGE[1]}, ignore_eos), "
          f"dtype {args.dtype}, {args.threads} threads, seed {args.seed}", flush=True)
    busy_before = cpu_busy_fraction()
    load_before = os.getloadavg()
    print(f"CPU busy before start: {busy_before}, load average {load_before[0]:.2f}", flush=True)

    results: dict[str, dict] = {}
    results["fuselm"] = run_fuselm(work, args.dtype, args.threads, args.seed, extra)
    print(f"fuselm done in {results['fuselm']['seconds']:.1f} s "
          f"(other processes used {results['fuselm']['other_processes_cpu_cores']} cores meanwhile)", flush=True)
    if not args.skip_hf:
        results["hf"] = run_hf(work, args.dtype, args.threads, args.hf_batch_size, args.hf_dir)
        print(f"HF done in {results['hf']['seconds']:.1f} s "
              f"(other processes used {results['hf']['other_processes_cpu_cores']} cores meanwhile)", flush=True)
    load_after = os.getloadavg()

    for r in results.values():
        r["output_tok_per_s"] = r["output_tokens"] / r["seconds"]
        r["total_tok_per_s"] = (prompt_tokens + r["output_tokens"]) / r["seconds"]
    rows = [("fuselm (1 call)", results["fuselm"])]
    if "hf" in results:
        rows.append((f"HF generate (bs {args.hf_batch_size})", results["hf"]))
    print()
    print_table(rows, prompt_tokens, len(work))
    summary = {}
    if "hf" in results:
        hf = results["hf"]
        summary = {"output_tok_per_s_ratio_fuselm_over_hf": results["fuselm"]["output_tok_per_s"] / hf["output_tok_per_s"],
                   "total_tok_per_s_ratio_fuselm_over_hf": results["fuselm"]["total_tok_per_s"] / hf["total_tok_per_s"],
                   "greedy_agreement": agreement(results["fuselm"]["tokens"], hf["tokens"])}
        print(f"\nratio fuselm / HF: {summary['output_tok_per_s_ratio_fuselm_over_hf']:.2f}x output tok/s, "
              f"{summary['total_tok_per_s_ratio_fuselm_over_hf']:.2f}x total tok/s")
        print(f"HF output tokens count only each request's own target length: every batch of "
              f"{args.hf_batch_size} decodes max_new_tokens = min_new_tokens = the batch's longest target, so HF "
              f"computed {hf['generated_tokens']} output tokens to deliver {hf['output_tokens']}.")
        agree = summary["greedy_agreement"]
        print(f"greedy outputs identical for {agree['identical_requests']}/{agree['requests']} requests "
              f"(mean common prefix {agree['mean_common_prefix_tokens']} tokens)")
    others = {name: r["other_processes_cpu_cores"] for name, r in results.items()}
    print(f"CPU used by other processes during the timed runs (cores of {os.cpu_count()}): {others}; "
          f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}. Anything well above 0 "
          "means the engines shared the CPU and the figures are not clean.")

    report = {
        "benchmark": "offline_throughput",
        "timestamp": datetime.now().isoformat(timespec="seconds"),
        "model": Path(default_model_path()).name,
        "dtype": args.dtype,
        "system": system_info(args.threads),
        "cpu_busy_fraction_before": busy_before,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "workload": {"num_requests": len(work), "seed": args.seed, "prompt_tokens": prompt_tokens,
                     "output_tokens": target_tokens, "prompt_len_range": PROMPT_RANGE, "output_len_range": OUTPUT_RANGE,
                     "text": args.text.name, "text_tokens": len(text_ids), "ignore_eos": True, "greedy": True},
        "fuselm": {k: v for k, v in results["fuselm"].items() if k != "tokens"} | {"engine_options": extra},
        "hf": ({k: v for k, v in results["hf"].items() if k != "tokens"} | {"batch_size": args.hf_batch_size,
               "useful_output_tokens_note": "sum of each request's own target length; generated_tokens is what "
                                            "the padded batches actually decoded"}) if "hf" in results else None,
        **summary,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"offline_throughput_{args.dtype}_{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
