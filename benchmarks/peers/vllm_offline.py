"""vLLM's offline `LLM.generate` on the workload of benchmarks/offline_throughput.py.

Two halves, run by two interpreters (benchmarks/peers/vllm_cpu.sh offline does both):

    # fuselm's venv: the same tokenizer and make_workload as offline_throughput.py -> token ids in JSON
    .venv/bin/python benchmarks/peers/vllm_offline.py make-workload --out W.json --num-requests 256 --seed 0
    # vLLM's venv: greedy, ignore_eos, exactly each request's own output length, one generate call
    benchmarks/peers/.venv-vllm/bin/python benchmarks/peers/vllm_offline.py run --workload W.json --hf-dir DIR

The second half imports nothing from fuselm, so vLLM's venv does not need it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_workload(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE.parent))
    import offline_throughput as ot

    from fuselm.loader.defaults import default_model_path
    from fuselm.loader.gguf import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(default_model_path())
    text = Path(args.text or ot.DEFAULT_TEXT)
    text_ids = tokenizer.encode(text.read_text(encoding="utf-8"), add_special_tokens=False)
    work = ot.make_workload(text_ids, args.num_requests, args.seed)
    doc = {"num_requests": len(work), "seed": args.seed, "text": text.name, "model": Path(default_model_path()).name,
           "prompt_len_range": ot.PROMPT_RANGE, "output_len_range": ot.OUTPUT_RANGE,
           "requests": [{"prompt_token_ids": p, "output_len": o} for p, o in work]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc))
    print(f"workload: {len(work)} requests, {sum(len(p) for p, _ in work)} prompt tokens, "
          f"{sum(o for _, o in work)} output tokens -> {args.out}", flush=True)


def run(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    doc = json.loads(Path(args.workload).read_text())
    reqs = doc["requests"]
    t0 = time.perf_counter()
    llm = LLM(model=str(args.hf_dir), dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len,
              enable_prefix_caching=not args.no_prefix_caching,
              **({"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}))
    load_s = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs]
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r["output_len"], min_tokens=r["output_len"])
              for r in reqs]
    llm.generate([{"prompt_token_ids": reqs[0]["prompt_token_ids"][:16]}] * 2,
                 SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up, untimed
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=sys.stderr.isatty())
    seconds = time.perf_counter() - t0
    out_tokens = 0
    for r, o in zip(reqs, outs):
        n = len(o.outputs[0].token_ids)
        if n != r["output_len"]:
            raise RuntimeError(f"vLLM returned {n} tokens for a request that asked for {r['output_len']}")
        out_tokens += n
    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in reqs)
    import torch
    import vllm

    res = {"benchmark": "offline_throughput_vllm_cpu", "timestamp": datetime.now().isoformat(timespec="seconds"),
           "model": doc.get("model"), "hf_dir": str(args.hf_dir), "dtype": args.dtype,
           "workload": {k: v for k, v in doc.items() if k != "requests"} | {"prompt_tokens": prompt_tokens,
                                                                            "output_tokens": out_tokens},
           "vllm": {"seconds": seconds, "load_seconds": load_s, "output_tokens": out_tokens,
                    "output_tok_per_s": out_tokens / seconds, "total_tok_per_s": (prompt_tokens + out_tokens) / seconds,
                    "version": vllm.__version__, "torch_version": torch.__version__,
                    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                    "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")},
           "system": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}
    print(f"vLLM CPU: {len(reqs)} requests, {prompt_tokens} prompt + {out_tokens} output tokens in {seconds:.1f} s "
          f"-> {out_tokens / seconds:.1f} output tok/s, {(prompt_tokens + out_tokens) / seconds:.1f} total tok/s "
          f"(load {load_s:.1f} s)", flush=True)
    out = args.json or args.results_dir / f"offline_throughput_vllm_cpu_{args.dtype}_{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    mw = sub.add_parser("make-workload")
    mw.add_argument("--out", required=True)
    mw.add_argument("--num-requests", type=int, default=256)
    mw.add_argument("--seed", type=int, default=0)
    mw.add_argument("--text", default=None)
    r = sub.add_parser("run")
    r.add_argument("--workload", required=True)
    r.add_argument("--hf-dir", type=Path, required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-model-len", type=int, default=2048)
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    r.add_argument("--max-num-seqs", type=int, default=None)
    r.add_argument("--no-prefix-caching", action="store_true", help="turn vLLM's automatic prefix caching off")
    r.add_argument("--results-dir", type=Path, default=HERE.parent / "results")
    r.add_argument("--json", type=Path, default=None, help="result file (default: RESULTS_DIR/offline_throughput_vllm_cpu_...)")
    args = p.parse_args()
    if args.cmd == "make-workload":
        make_workload(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
