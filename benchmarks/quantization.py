"""Quantised weights and KV cache: decode speed, throughput, memory (issue 6's benchmark; not a test).

For each model and weight variant, in a fresh process (so peak RSS is that variant's own):
batch-1 decode tok/s and batch-32 decode throughput (greedy, ignore_eos, prompts prefilled first),
weight bytes, peak RSS. Variants: `none` (GGUF dequantised to float32, the machine's auto dtype
on AVX2; bfloat16 where asked), `int8` / `int4` (round to nearest at load), `gguf` (the file's own
quantisation kept). Optionally llama.cpp's llama-bench on GGUFs of the same weights, and the
number of concurrent full-length sequences a fixed KV budget holds with auto vs int8 KV.

    .venv/bin/python benchmarks/quantization.py                       # SmolLM2 (embedded)
    .venv/bin/python benchmarks/quantization.py --model .build/qwen2.5-coder-1.5b-q4_k_m.gguf --tokens 32
    .venv/bin/python benchmarks/quantization.py --llama-bench benchmarks/peers/.build/llama.cpp-build/bin/llama-bench \
        --llama-gguf Q4_1=path.gguf --llama-gguf Q8_0=path2.gguf
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"none": {"quantization": "none"}, "bf16": {"quantization": "none", "dtype": "bfloat16"},
            "int8": {"quantization": "int8"}, "int4": {"quantization": "int4"}, "gguf": {}}


def _decode_rate(llm, batch: int, tokens: int) -> float:
    from fuselm import SamplingParams

    prompts = [f"Write a long story about a dragon called number {i}, with many details." for i in range(batch)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # prefix-cache the prompts
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    first = min(o.metrics.first_token_time for o in out)
    last = max(o.metrics.last_token_time for o in out)
    return batch * (tokens - 1) / (last - first)


def run_one(model: str | None, variant: str, batches: list[int], tokens: int, repeats: int) -> dict:
    from fuselm import LLM

    start = time.perf_counter()
    llm = LLM(model, max_num_seqs=max(batches), **VARIANTS[variant])
    load = time.perf_counter() - start
    result = {"variant": variant, "load_s": round(load, 2), "weight_mib": round(llm.engine.runner.weight_bytes / 2**20, 1),
              "dtype": str(llm.engine.dtype).removeprefix("torch.")}
    for b in batches:
        result[f"batch{b}_tok_s"] = round(max(_decode_rate(llm, b, tokens) for _ in range(repeats)), 2)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def kv_capacity(budget_mib: int, seq_len: int) -> dict:
    from fuselm import LLM

    out = {}
    for kv in ("auto", "int8"):
        runner = LLM(kv_cache_dtype=kv, kv_cache_memory_bytes=budget_mib << 20).engine.runner
        out[kv] = {"blocks": runner.num_blocks, "tokens": runner.num_blocks * runner.block_size,
                   "sequences": runner.num_blocks * runner.block_size // seq_len}
    return out


def llama_bench(binary: str, gguf: str, threads: int) -> float:
    text = subprocess.run([binary, "-m", gguf, "-p", "0", "-n", "128", "-t", str(threads), "-r", "3", "-o", "json"],
                          capture_output=True, text=True, check=True).stdout
    return round(json.loads(text)[0]["avg_ts"], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    ap.add_argument("--variants", default="none,int8,int4,gguf")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per figure")
    ap.add_argument("--kv-budget-mib", type=int, default=64, help="KV budget for the auto-vs-int8 capacity figure")
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary (benchmarks/peers/llama_cpp.sh build)")
    ap.add_argument("--llama-gguf", action="append", default=[], help="NAME=PATH of a GGUF for llama-bench")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>-quantization-<model>.json)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.one:
        model = None if args.one[0] == "-" else args.one[0]
        print(json.dumps(run_one(model, args.one[1], batches, args.tokens, args.repeats)))
        return
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", args.model or "-", variant, "--batches", args.batches,
               "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
        line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(line))
        print(rows[-1], flush=True)
    import os

    threads = os.cpu_count() or 1
    peers = {}
    for spec in args.llama_gguf:
        name, path = spec.split("=", 1)
        peers[name] = llama_bench(args.llama_bench, path, threads)
        print("llama.cpp", name, peers[name], flush=True)
    kv = kv_capacity(args.kv_budget_mib, 2048) if args.model is None else None
    cpu = re.sub(r"\s+", " ", next((ln.split(":", 1)[1] for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                                   platform.processor())).strip()
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cores": threads, "model": args.model or "embedded SmolLM2-135M Q4_1",
              "tokens": args.tokens, "fuselm": rows, "llama_cpp_batch1_tok_s": peers, "kv_capacity": kv}
    name = Path(args.model).stem if args.model else "smollm2"
    out = Path(args.out or f"benchmarks/results/{report['date']}-quantization-{name}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
