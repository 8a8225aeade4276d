"""Tensor parallelism on this machine, and a scaling model for a GPU node (not a test).

Measured here (CPU, gloo):
- offline output tok/s on the chat workload (fuselm/bench/workloads.py) of one process with T
  threads against TP=2 with T/2 threads per rank (each rank pinned to its own cores), on a
  random-weight Llama-shaped model saved as an HF directory (float32);
- rank 0's all-reduce time per engine step (waiting for the other rank included) and per call;
- gloo's all-reduce cost between two local processes for message sizes 4 KiB .. 4 MiB, fitted to
  latency + bytes / bandwidth.

Then the scaling model (docs/parallel.md explains it): decode step time on a GPU node for TP=1..8
from per-layer weight streaming, a per-layer fixed cost, and ring all-reduce cost
fixed + 2(N-1) * hop latency + 2(N-1)/N * bytes / bandwidth over NVLink or PCIe, for a 1.5B and a 7B model.

    .venv/bin/python benchmarks/tensor_parallel.py                     # 64 chat requests, both set-ups
    .venv/bin/python benchmarks/tensor_parallel.py --model-only        # only the GPU scaling table

Results: benchmarks/results/tensor-parallel-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny tokenizer

SHAPE = dict(hidden=768, heads=12, kv_heads=4, intermediate=2048, layers=8, vocab=32000)


def make_model(path: Path) -> None:
    """A random Llama of SHAPE (about 100M parameters) with the tests' small BPE tokenizer."""
    import transformers

    from tiny_models import save_tokenizer

    if (path / "config.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    save_tokenizer(path, 384)
    s = SHAPE
    config = transformers.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                      num_key_value_heads=s["kv_heads"], max_position_embeddings=2048,
                                      bos_token_id=1, eos_token_id=4)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)


def run_engine(model: str, tp: int, threads: int, num_requests: int) -> dict:
    from fuselm import LLM
    from fuselm.bench.throughput import run_throughput
    from fuselm.bench.workloads import chat_workload, load_text

    llm = LLM(model, dtype="float32", device="cpu", tensor_parallel_size=tp, num_threads=threads,
              max_model_len=1024, max_num_batched_tokens=512, kv_cache_memory_bytes=1 << 30)
    try:
        text_ids = llm.get_tokenizer().encode(load_text(), add_special_tokens=False)
        requests = chat_workload(text_ids, num_requests, seed=0, input_len=(4, 512), output_len=(4, 256))
        steps_before = llm.engine.stats.num_steps
        result = run_throughput(llm, requests)
        result["steps"] = llm.engine.stats.num_steps - steps_before
        result["step_ms"] = 1000 * result["elapsed_s"] / result["steps"]
        if tp > 1:
            stats = llm.engine.runner.group.stats
            llm.engine.shutdown()
            ranks = llm.engine.runner.rank_collective_stats
            result["all_reduce"] = [dict(rank=i, calls=s.all_reduce_calls, seconds=s.all_reduce_seconds,
                                         bytes=s.all_reduce_bytes, gather_seconds=s.gather_seconds)
                                    for i, s in enumerate(ranks)]
            steps = llm.engine.stats.num_steps
            result["all_reduce_ms_per_step_rank0"] = 1000 * stats.all_reduce_seconds / steps
            result["all_reduce_us_per_call_rank0"] = 1e6 * stats.all_reduce_seconds / max(1, stats.all_reduce_calls)
            result["all_reduce_share_of_step"] = stats.all_reduce_seconds / result["elapsed_s"]
        return result
    finally:
        llm.engine.shutdown()


def _gloo_rank(rank: int, port: int, sizes: list[int], iters: int, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.sched_setaffinity(0, [sorted(os.sched_getaffinity(0))[rank % os.cpu_count()]])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    times = {}
    for size in sizes:
        x = torch.ones(size // 4)
        for _ in range(5):
            dist.all_reduce(x)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        times[size] = (time.perf_counter() - t0) / iters
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def gloo_all_reduce_cost(iters: int = 200) -> dict:
    """Seconds per all-reduce of 2 local gloo ranks by message size, and the fitted latency and bandwidth."""
    import multiprocessing as mp

    from fuselm.executor.executor import free_port

    sizes = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_gloo_rank, args=(r, port, sizes, iters, queue)) for r in range(2)]
    for p in procs:
        p.start()
    times = queue.get(timeout=300)
    for p in procs:
        p.join(60)
    # least squares t = a + b * bytes (2 ranks: the ring moves 2(N-1)/N = 1 x the message)
    xs, ys = torch.tensor(sizes, dtype=torch.float64), torch.tensor([times[s] for s in sizes], dtype=torch.float64)
    b = ((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()
    a = ys.mean() - b * xs.mean()
    return {"seconds_by_bytes": {str(k): v for k, v in times.items()}, "latency_us": float(a) * 1e6,
            "bandwidth_GBps": float(1 / b) / 1e9}


# ---- the GPU scaling model ---------------------------------------------------------------------

MODELS = {  # per layer: parameters streamed each decode step; hidden size (the all-reduced width)
    "1.5B (Qwen2.5-1.5B shape)": dict(layers=28, hidden=1536, intermediate=8960, heads=12, kv_heads=2, vocab=151936),
    "7B (Llama-2-7B shape)": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
}
LINKS = {  # a collective's fixed cost (launch, synchronisation), each ring step's latency, the bus bandwidth
    "NVLink (H100 SXM, NVSwitch)": dict(fixed_us=5.0, hop_latency_us=1.0, bandwidth_GBps=360.0),
    "PCIe Gen4 x16": dict(fixed_us=8.0, hop_latency_us=5.0, bandwidth_GBps=22.0),
}
HBM_GBPS = 2400.0  # H100 SXM HBM3 3.35 TB/s peak; what decode GEMVs sustain
LAYER_FIXED_US = 12.0  # per layer, not sharded: ~10 kernels (norms, rotary, attention, activations) with CUDA graphs
BYTES = 2  # bfloat16


def layer_params(m: dict) -> int:
    h, d = m["hidden"], m["hidden"] // m["heads"]
    qkv = h * (m["heads"] + 2 * m["kv_heads"]) * d
    return qkv + m["heads"] * d * h + 3 * h * m["intermediate"]


def ring_all_reduce_us(n: int, nbytes: int, link: dict) -> float:
    if n == 1:
        return 0.0
    return (link["fixed_us"] + 2 * (n - 1) * link["hop_latency_us"]
            + 2 * (n - 1) / n * nbytes / (link["bandwidth_GBps"] * 1e3))


def predict(m: dict, n: int, batch: int, link: dict) -> dict:
    """Decode step time (µs) and output tok/s of `batch` sequences on n GPUs (KV reads left out:
    they shard with the heads the same way as the weights)."""
    weights_us = layer_params(m) * BYTES / n / (HBM_GBPS * 1e3)
    comm_us = 2 * ring_all_reduce_us(n, batch * m["hidden"] * BYTES, link)
    head_us = m["vocab"] * m["hidden"] * BYTES / n / (HBM_GBPS * 1e3)
    step = m["layers"] * (weights_us + LAYER_FIXED_US + comm_us) + head_us
    return {"tp": n, "step_us": step, "tok_s": batch * 1e6 / step, "comm_share": m["layers"] * comm_us / step}


def scaling_table(batch: int = 32) -> dict:
    table = {}
    for name, m in MODELS.items():
        for link_name, link in LINKS.items():
            rows = [predict(m, n, batch, link) for n in (1, 2, 4, 8)]
            for row in rows:
                row["speedup"] = rows[0]["step_us"] / row["step_us"]
            table[f"{name}, {link_name}, batch {batch}"] = rows
    return table


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="one process's threads; TP=2 gives each rank half")
    p.add_argument("--model-dir", default="/tmp/fuselm-tp-bench-model")
    p.add_argument("--model-only", action="store_true", help="print the GPU scaling table only")
    args = p.parse_args()
    results: dict = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "shape": SHAPE,
                     "gpu_model": {"hbm_GBps": HBM_GBPS, "layer_fixed_us": LAYER_FIXED_US, "links": LINKS,
                                   "table": scaling_table()}}
    if not args.model_only:
        make_model(Path(args.model_dir))
        results["gloo_all_reduce"] = gloo_all_reduce_cost()
        results["one_process"] = run_engine(args.model_dir, 1, args.threads, args.num_requests)
        results["tp2"] = run_engine(args.model_dir, 2, max(1, args.threads // 2), args.num_requests)
        results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        results["load_average_after_run"] = list(os.getloadavg())  # other work on the cores skews both runs
    print(json.dumps(results, indent=1))
    if not args.model_only:
        slug = "epyc" if "EPYC" in results["cpu"] else results["cpu"].split()[0].lower()
        out = HERE / "results" / f"tensor-parallel-{slug}-{results['cores']}core.json"
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
