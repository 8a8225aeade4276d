"""Shared-prefix attention: decode attention time per step and end-to-end output tok/s with
`enable_cascade_attention` on and off, and vLLM CPU (prefix caching on) on the same token ids.

Workloads (SmolLM2-135M-Instruct: fuselm loads the embedded GGUF, or `--fuselm-model`; prompts cut from
benchmarks/data/public_domain_prose.txt): R requests whose prompts are one shared prefix of S tokens
plus a tail of their own (16-47 tokens), each decoding exactly `--output-len` tokens greedily; and
`n = 16` samples of one prompt of the longest S (vLLM gets 16 copies of the prompt: it shares their
blocks through its prefix cache). Per shape:

- attention: the C decode kernel's time for one step (one call per layer, the model's head shapes,
  KV dtype and threads) over the step's block tables at the middle of decoding (each row's own part
  = its tail + half the output), per-row kernel vs the shared-prefix kernel, best of `--repeats`;
- end to end: offline `LLM.generate` of the whole workload (prefill included), on then off,
  alternated `--runs` times, output tok/s;
- vLLM: benchmarks/peers/vllm_offline.py run in vLLM's own venv on the same token ids
  (`--vllm-python`, `--hf-dir`; skipped with --skip-vllm or when the venv is missing).

`--kernel-sweep` instead times the two kernels over groups of 2..64 rows sharing 1..64 blocks: the
measurement behind fuselm/layers/cascade.py's minimum group size and shared length. `--families F`
instead runs F prompt families arriving interleaved with `prefix_aware_admission` on and off.

    .venv/bin/python benchmarks/shared_prefix.py --shared 1000,2000,4000 --dtype bfloat16
    .venv/bin/python benchmarks/shared_prefix.py --shared 500 --rows 16 --output-len 32 --skip-vllm  # quick check
    .venv/bin/python benchmarks/shared_prefix.py --kernel-sweep
    .venv/bin/python benchmarks/shared_prefix.py --families 8 --rows 128 --shared 1000 --max-num-seqs 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "public_domain_prose.txt"
TAIL_RANGE = (16, 47)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default="1000,2000,4000", help="shared prefix lengths in tokens, comma-separated")
    p.add_argument("--rows", type=int, default=64, help="requests sharing each prefix")
    p.add_argument("--n", type=int, default=16, help="samples of one prompt (the longest prefix); 0 skips it")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--runs", type=int, default=1, help="end-to-end runs per setting, on/off alternated")
    p.add_argument("--repeats", type=int, default=5, help="attention timings per kernel (best is kept)")
    p.add_argument("--kv-cache-gib", type=int, default=2, help="KV cache of each fuselm engine (two are loaded)")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-e2e", action="store_true", help="attention timings only")
    p.add_argument("--vllm-python", type=Path, default=HERE / "peers" / ".venv-vllm" / "bin" / "python")
    p.add_argument("--hf-dir", type=Path, default=None, help="HF export of the model for vLLM (default: the peers' "
                                                              "export for --dtype)")
    p.add_argument("--fuselm-model", default=None,
                   help="the model fuselm loads (default: the embedded GGUF); give --hf-dir's path to run both "
                        "engines on the same float weights")
    p.add_argument("--kernel-sweep", action="store_true", help="time the kernels over group sizes and lengths")
    p.add_argument("--families", type=int, default=0,
                   help="instead: F prompt families (own prefix each, --rows requests in all) arriving interleaved, "
                        "end to end with prefix_aware_admission on and off (shared-prefix attention on)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="the engines' max_num_seqs (default: fuselm's)")
    p.add_argument("--tag", default=None, help="result file name: benchmarks/results/shared-prefix-TAG.json")
    return p.parse_args()


def prompt_ids(shared: int, rows: int, seed: int, prefix_start: int = 0) -> list[list[int]]:
    from fuselm.loader.defaults import default_model_path
    from fuselm.loader.gguf import load_gguf_tokenizer

    ids = load_gguf_tokenizer(default_model_path()).encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    if prefix_start + shared + TAIL_RANGE[1] >= len(ids):  # a cut-short prefix would share less than asked
        raise SystemExit(f"{TEXT.name} has {len(ids)} tokens: too few for a prefix of tokens {prefix_start}.."
                         f"{prefix_start + shared} and its tails (fewer --families or a shorter --shared)")
    rng = random.Random(seed)
    prefix = ids[prefix_start:prefix_start + shared]
    tails = []
    for _ in range(rows):
        n = rng.randint(*TAIL_RANGE)
        start = rng.randrange(shared, len(ids) - n)
        tails.append(ids[start:start + n])
    return [prefix + t for t in tails]


# ---- decode attention per step -----------------------------------------------------------------

def step_tables(rows: int, shared: int, own: list[int], block_size: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """Block tables of `rows` sequences sharing `shared` tokens' blocks, each with `own[i]` tokens past
    them in blocks of its own; the blocks of different rows are interleaved in the pool, as they are
    handed out while they decode together."""
    shared_blocks = shared // block_size
    prefix = tuple(range(shared_blocks))
    longest = max(own) + shared % block_size
    per_row = -(-longest // block_size)
    tables, lens = [], []
    for r in range(rows):
        tables.append(prefix + tuple(shared_blocks + j * rows + r for j in range(per_row)))
        lens.append(shared + own[r])
    return tables, lens


def time_attention(kernels, layers: int, kv_heads: int, heads: int, head_dim: int, block_size: int,
                   q_dtype: torch.dtype, kv_dtype: torch.dtype, tables, lens, repeats: int) -> dict:
    """Seconds of one decode step's attention (one kernel call per layer), per-row and shared-prefix."""
    from fuselm.layers.cascade import plan_shared_prefix

    num_blocks = max(max(t) for t in tables) + 1
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [(torch.randn(shape).to(kv_dtype), torch.randn(shape).to(kv_dtype)) for _ in range(min(layers, 4))]
    width = max(len(t) for t in tables)
    table = torch.tensor([t + (0,) * (width - len(t)) for t in tables], dtype=torch.long)
    ctx = torch.tensor(lens)
    q = torch.randn(len(tables), heads, head_dim).to(q_dtype)
    out = torch.empty_like(q)
    plan = plan_shared_prefix(tables, lens, block_size, min_rows=2, min_blocks=1, min_reads=0)  # timed at any size
    scale = head_dim ** -0.5

    def per_row():
        for layer in range(layers):
            k, v = caches[layer % len(caches)]
            kernels.paged_decode_attention(q, out, k, v, table, ctx, scale)

    def shared():
        for layer in range(layers):
            k, v = caches[layer % len(caches)]
            kernels.cascade_attention(q, out, k, v, table, ctx, scale, plan.encoded)

    kernels_timed = {"per_row": per_row, "shared_prefix": shared}
    result = dict.fromkeys(kernels_timed, float("inf"))
    for fn in kernels_timed.values():
        fn()
    for _ in range(repeats):  # alternated, so a change in the machine's load hits both alike
        for name, fn in kernels_timed.items():
            t0 = time.perf_counter()
            fn()
            result[name] = min(result[name], time.perf_counter() - t0)
    result["speedup"] = result["per_row"] / result["shared_prefix"]
    return result


def model_shapes(llm) -> dict:
    runner = llm.engine.runner
    mc = runner.model_config
    attn = runner.model.layers[0].self_attn
    return {"layers": mc.num_hidden_layers, "kv_heads": mc.num_key_value_heads, "heads": mc.num_attention_heads,
            "head_dim": mc.head_dim, "block_size": runner.block_size, "q_dtype": runner.dtype,
            "kv_dtype": attn.k_cache.dtype}


def kernel_sweep(args, kernels, shapes: dict) -> list[dict]:
    rows_list, blocks_list = (2, 4, 8, 16, 64), (1, 2, 4, 8, 16, 64)
    results = []
    for rows in rows_list:
        for blocks in blocks_list:
            shared = blocks * shapes["block_size"]
            tables, lens = step_tables(rows, shared, [40 + 7 * (r % 5) for r in range(rows)], shapes["block_size"])
            t = time_attention(kernels, 1, shapes["kv_heads"], shapes["heads"], shapes["head_dim"],
                               shapes["block_size"], shapes["q_dtype"], shapes["kv_dtype"], tables, lens,
                               max(args.repeats, 20))
            results.append({"rows": rows, "shared_blocks": blocks, **t})
            print(f"rows {rows:3d} shared blocks {blocks:3d}: per-row {t['per_row'] * 1e6:8.1f} us, shared-prefix "
                  f"{t['shared_prefix'] * 1e6:8.1f} us, x{t['speedup']:.2f}", flush=True)
    return results


# ---- end to end ---------------------------------------------------------------------------------

def admission_comparison(args, report: dict) -> None:
    """Interleaved prompt families, prefix_aware_admission on and off: output tok/s and the KV reads
    shared-prefix attention saved (larger groups save more), alternated --runs times per shape."""
    from fuselm import LLM

    options = {} if args.max_num_seqs is None else {"max_num_seqs": args.max_num_seqs}
    engines = {on: LLM(dtype=args.dtype, prefix_aware_admission=on, max_model_len=8192,
                       kv_cache_memory_bytes=args.kv_cache_gib << 30, **options) for on in (True, False)}
    for llm in engines.values():
        run_fuselm(llm, [list(range(100, 164))] * 2, 4)
    per_family = args.rows // args.families
    if per_family == 0:
        raise SystemExit(f"--rows {args.rows} is fewer than --families {args.families}")
    for shared in map(int, args.shared.split(",")):
        families = [prompt_ids(shared, per_family, seed=shared + f, prefix_start=f * shared)
                    for f in range(args.families)]
        prompts = [families[i % args.families][i // args.families] for i in range(per_family * args.families)]
        entry = {"label": f"{args.families} families x {per_family} requests, {shared} shared tokens each",
                 "shared": shared, "rows": len(prompts)}
        for on in (True, False):
            entry[f"admission_{'on' if on else 'off'}_tok_s"] = []
            entry[f"admission_{'on' if on else 'off'}_kv_tokens_saved"] = []
        for _ in range(args.runs):
            for on, llm in engines.items():
                runner = llm.engine.runner
                saved = runner.cascade_kv_tokens_saved
                tok_s = run_fuselm(llm, prompts, args.output_len)
                key = "on" if on else "off"
                entry[f"admission_{key}_tok_s"].append(tok_s)
                entry[f"admission_{key}_kv_tokens_saved"].append(runner.cascade_kv_tokens_saved - saved)
        print(f"{entry['label']}: output tok/s admission on {max(entry['admission_on_tok_s']):.1f} "
              f"(KV reads saved per layer {entry['admission_on_kv_tokens_saved'][-1]}), off "
              f"{max(entry['admission_off_tok_s']):.1f} ({entry['admission_off_kv_tokens_saved'][-1]})", flush=True)
        report["shapes"].append(entry)


def run_fuselm(llm, prompts: list[list[int]], output_len: int, n: int = 1) -> float:
    from fuselm import SamplingParams

    params = SamplingParams(temperature=0 if n == 1 else 0.8, seed=0, n=n, max_tokens=output_len,
                            min_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    assert tokens == len(prompts) * n * output_len
    return tokens / seconds


def run_vllm(args, prompts: list[list[int]], output_len: int) -> float | None:
    hf_dir = args.hf_dir or HERE / "peers" / ".build" / ("hf-f32" if args.dtype == "float32" else "hf-bf16")
    if args.skip_vllm:
        return None
    for path, how in ((args.vllm_python, "benchmarks/peers/vllm_cpu.sh install"),
                      (hf_dir, f"DTYPE={args.dtype} benchmarks/peers/vllm_cpu.sh export")):
        if not path.exists():
            print(f"vLLM skipped: {path} is missing ({how} makes it)", flush=True)
            return None
    with tempfile.TemporaryDirectory() as tmp:
        work, result = Path(tmp) / "w.json", Path(tmp) / "r.json"
        work.write_text(json.dumps({"requests": [{"prompt_token_ids": p, "output_len": output_len} for p in prompts]}))
        cmd = [str(args.vllm_python), str(HERE / "peers" / "vllm_offline.py"), "run", "--workload", str(work),
               "--hf-dir", str(hf_dir), "--dtype", args.dtype, "--max-model-len", "8192", "--json", str(result)]
        env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "auto"} | dict(os.environ)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env | {"VLLM_TARGET_DEVICE": "cpu"})
        if proc.returncode != 0:
            print(f"vLLM failed:\n{proc.stderr.strip()[-4000:]}", flush=True)
            return None
        return json.loads(result.read_text())["vllm"]["output_tok_per_s"]


def main() -> None:
    args = parse_args()
    from fuselm import LLM
    from fuselm.kernels.build import cpu_model_name

    if args.families:
        report = {"benchmark": "shared_prefix_admission", "timestamp": datetime.now().isoformat(timespec="seconds"),
                  "cpu": cpu_model_name(), "threads": torch.get_num_threads(), "dtype": args.dtype,
                  "output_len": args.output_len, "shapes": []}
        admission_comparison(args, report)
        write_report(args, report)
        return

    model = {} if args.fuselm_model is None else {"model": args.fuselm_model}
    engines = {on: LLM(dtype=args.dtype, enable_cascade_attention=on, max_model_len=8192,
                       kv_cache_memory_bytes=args.kv_cache_gib << 30, **model) for on in (True, False)}
    for llm in engines.values():  # warm-up, untimed (as vllm_offline.py does for vLLM)
        run_fuselm(llm, [list(range(100, 164))] * 2, 4)
    kernels = engines[True].engine.runner.cpu_kernels
    shapes = model_shapes(engines[True])
    report = {"benchmark": "shared_prefix", "timestamp": datetime.now().isoformat(timespec="seconds"),
              "cpu": cpu_model_name(), "threads": torch.get_num_threads(), "dtype": args.dtype,
              "kv_dtype": str(shapes["kv_dtype"]).removeprefix("torch."), "isa": getattr(kernels, "isa", None),
              "output_len": args.output_len, "fuselm_model": args.fuselm_model or "embedded GGUF",
              "shapes": []}
    if kernels is None:
        sys.exit("the C kernels are not in use: nothing to compare")
    if args.kernel_sweep:
        report["kernel_sweep"] = kernel_sweep(args, kernels, shapes)
    else:
        cases = [(s, args.rows, 1) for s in map(int, args.shared.split(","))]
        if args.n:
            cases.append((max(c[0] for c in cases), 1, args.n))
        for shared, rows, n in cases:
            prompts = prompt_ids(shared, rows, seed=shared)
            label = f"{rows} x {shared} shared" if n == 1 else f"n={n} of one {shared}-token prompt"
            own = [len(p) - shared + args.output_len // 2 for p in prompts for _ in range(n)]
            tables, lens = step_tables(rows * n, shared - shared % shapes["block_size"],
                                       [o + shared % shapes["block_size"] for o in own], shapes["block_size"])
            entry = {"label": label, "shared": shared, "rows": rows * n,
                     "attention_step_s": time_attention(kernels, shapes["layers"], shapes["kv_heads"], shapes["heads"],
                                                        shapes["head_dim"], shapes["block_size"], shapes["q_dtype"],
                                                        shapes["kv_dtype"], tables, lens, args.repeats)}
            a = entry["attention_step_s"]
            print(f"{label}: decode attention per step {a['per_row'] * 1e3:.1f} ms per-row, "
                  f"{a['shared_prefix'] * 1e3:.1f} ms shared-prefix (x{a['speedup']:.2f})", flush=True)
            if not args.skip_e2e:
                runs = {True: [], False: []}
                for _ in range(args.runs):
                    for on in (True, False):
                        runs[on].append(run_fuselm(engines[on], prompts, args.output_len, n))
                entry["fuselm_on_tok_s"], entry["fuselm_off_tok_s"] = runs[True], runs[False]
                entry["vllm_tok_s"] = run_vllm(args, [p for p in prompts for _ in range(n)], args.output_len)
                vllm = entry["vllm_tok_s"]
                print(f"{label}: output tok/s cascade on {max(runs[True]):.1f}, off {max(runs[False]):.1f}, "
                      f"vLLM {'-' if vllm is None else f'{vllm:.1f}'}", flush=True)
            report["shapes"].append(entry)
    write_report(args, report)


def write_report(args, report: dict) -> None:
    tag = args.tag or f"{args.dtype}-{datetime.now():%Y%m%d-%H%M%S}"
    out = HERE / "results" / f"shared-prefix-{tag}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
