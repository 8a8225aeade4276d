"""The CPU attention kernels at SmolLM2-135M's shapes (9 query / 3 KV heads of 64, 16-token blocks), alternated in one
process so that a noisy neighbour or the VM's bandwidth switching slows both sides alike:

- `decode`: fuselm/kernels' paged decode attention over shuffled blocks read from memory (each call the next of
  ~300 MB of caches), in GB/s of K/V read, for each cache kind (`f32`: float32 queries and cache, `f32-bf16kv`,
  `bf16`: bfloat16 queries and cache, `int8kv`), this tree's kernels against another checkout's
  (`--baseline`, built by that tree's own build.py as benchmarks/decode_gemm.py does), and a plain read of the
  same blocks in the same order (torch's embedding_bag, sums only; float caches) alternated with them: the
  scattered-read rate of the moment, which each kernel's GB/s is given as a share of;
- `chunk`: a prompt chunk's causal attention, this tree's C kernel (kernels/chunk_attention.c) against the torch
  SDPA call the portable path makes (a first chunk: causal flash attention; a chunk over cached positions: the
  gathered context with an explicit mask), in GFLOP/s of the causal products.

    python benchmarks/attention_kernels.py --parts decode --baseline /tmp/before --json out.json
    python benchmarks/attention_kernels.py --parts chunk --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from decode_gemm import time_pair, tree_kernels  # noqa: E402  (another checkout's kernels, built by its own build.py)

from fuselm.bench.report import machine_info  # noqa: E402
from fuselm.kernels.cpu import get_kernels  # noqa: E402
from fuselm.layers.kv_quant import quantize_rows  # noqa: E402
from fuselm.layers.paged_attention import additive_mask, chunk_causal_allowed  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
COLD_BYTES = 300 * 2**20
KINDS = ("f32", "f32-bf16kv", "bf16", "int8kv")


def decode_inputs(kind: str, rows: int, context: int, g: torch.Generator) -> tuple:
    """q, caches of twice the blocks needed, shuffled block table, context lengths, int8 scales (or None)."""
    per_row = -(-context // BLOCK)
    shape = (2 * rows * per_row, BLOCK, KV_HEADS, DIM)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    ks = vs = None
    if kind == "int8kv":
        (k, ks), (v, vs) = quantize_rows(k), quantize_rows(v)
    elif kind in ("f32-bf16kv", "bf16"):
        k, v = k.bfloat16(), v.bfloat16()
    table = torch.randperm(shape[0], generator=g)[: rows * per_row].view(rows, per_row).contiguous()
    lens = torch.full((rows,), context, dtype=torch.int64)
    q = torch.randn(rows, HEADS, DIM, generator=g).to(torch.bfloat16 if kind == "bf16" else torch.float32)
    return q, k, v, table, lens, ks, vs


PLAIN_READ_BLOCKS = 8  # blocks per bag of the plain read: enough bags for every thread at any shape


def plain_read(sets: list[tuple]) -> tuple:
    """A call that reads the blocks the kernels read, in the same order, and only sums them (torch's
    embedding_bag over each cache's blocks as rows), and the bytes it reads per set: the scattered-read rate
    of the moment, which the kernels' GB/s are held against. Float caches only (embedding_bag takes no int8)."""
    jobs = []
    for _, k, v, table, _, _, _ in sets:
        idx = table.flatten()
        jobs.append((k.view(k.shape[0], -1), v.view(v.shape[0], -1), idx, torch.arange(0, idx.numel(), PLAIN_READ_BLOCKS)))

    def run():
        for k, v, idx, offsets in jobs:
            F.embedding_bag(idx, k, offsets, mode="sum")
            F.embedding_bag(idx, v, offsets, mode="sum")
    return run, sum(2 * idx.numel() * k.shape[1] * k.element_size() for k, _, idx, _ in jobs) / len(jobs)


def run_decode(ka, kb, kinds: list[str], shapes: list[tuple[int, int]], rounds: int) -> list[dict]:
    results = []
    for kind in kinds:
        for rows, context in shapes:
            g = torch.Generator().manual_seed(0)
            first = decode_inputs(kind, rows, context, g)
            read = 2 * rows * context * KV_HEADS * (DIM * first[1].element_size() + (2 if first[5] is not None else 0))
            sets = [first] + [decode_inputs(kind, rows, context, g) for _ in range(max(2, COLD_BYTES // read) - 1)]
            outs = [torch.empty_like(s[0]) for s in sets]

            def over(kernels):  # one call per set of caches, in turn; the figure is per call
                def run():
                    for (q, k, v, table, lens, ks, vs), out in zip(sets, outs):
                        kernels.paged_decode_attention(q, out, k, v, table, lens, DIM ** -0.5, k_scale=ks, v_scale=vs)
                return run

            sides = [("baseline", over(ka)), ("this tree", over(kb))] if ka is not None else [("this tree", over(kb))]
            scale = {name: 1.0 for name, _ in sides}  # a side's seconds per call, scaled to `read` bytes
            if kind != "int8kv":
                plain, plain_bytes = plain_read(sets)  # whole blocks: a little more than `read` where a row's last is partial
                sides.append(("plain read", plain))
                scale["plain read"] = read / plain_bytes
            times = {name: [] for name, _ in sides}
            for fn in (fn for _, fn in sides):
                fn()
            for i in range(rounds):
                for name, fn in sides if i % 2 == 0 else sides[::-1]:
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) / len(sets) * scale[name])
            row = {"part": "decode", "kind": kind, "rows": rows, "context": context, "bytes_per_call": read}
            for name, ts in times.items():
                row[name] = {"median_us": statistics.median(ts) * 1e6, "gbps_median": read / statistics.median(ts) / 1e9,
                             "gbps_best": read / min(ts) / 1e9}
            if ka is not None:
                row["ratio"] = row["this tree"]["gbps_median"] / row["baseline"]["gbps_median"]
            if "plain read" in times:
                row["of_plain_read"] = row["this tree"]["gbps_median"] / row["plain read"]["gbps_median"]
            results.append(row)
            print(f"decode {kind:10s} {rows:4d} x {context:5d}: " + "  ".join(
                f"{name} {row[name]['gbps_median']:5.1f} GB/s" for name in times) +
                (f"  {row['ratio']:.2f}x" if ka is not None else "") +
                (f"  ({row['of_plain_read']:.0%} of the plain read)" if "of_plain_read" in row else ""), flush=True)
    return results


def run_chunk(kb, shapes: list[tuple[int, int]], rounds: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    pool = 4096
    k_cache = torch.randn(pool, BLOCK, KV_HEADS, DIM, generator=g)
    v_cache = torch.randn(pool, BLOCK, KV_HEADS, DIM, generator=g)
    flat_k, flat_v = k_cache.view(-1, KV_HEADS, DIM), v_cache.view(-1, KV_HEADS, DIM)
    results = []
    for cached, n in shapes:
        total = cached + n
        blocks = torch.randperm(pool, generator=g)[: -(-total // BLOCK)]
        slots = (blocks.repeat_interleave(BLOCK)[:total] * BLOCK + torch.arange(total) % BLOCK).contiguous()
        q = torch.randn(n, HEADS, DIM, generator=g)
        out = torch.empty_like(q)
        qr = q.transpose(0, 1).unsqueeze(0)
        mask = additive_mask(chunk_causal_allowed(cached, n), torch.float32)  # as the torch path builds it

        # a first chunk's K/V are the layer's own new rows (no gather), a later chunk's context is gathered
        k_own, v_own = flat_k[slots].transpose(0, 1).unsqueeze(0), flat_v[slots].transpose(0, 1).unsqueeze(0)

        def torch_path():
            if cached == 0:
                return F.scaled_dot_product_attention(qr, k_own, v_own, is_causal=True, scale=DIM ** -0.5,
                                                      enable_gqa=True)
            kr = flat_k[slots].transpose(0, 1).unsqueeze(0)
            vr = flat_v[slots].transpose(0, 1).unsqueeze(0)
            return F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=DIM ** -0.5, enable_gqa=True)

        def c_path():
            kb.chunk_attention(q, out, k_cache, v_cache, slots, cached, DIM ** -0.5)

        want = torch_path()[0].transpose(0, 1)
        c_path()
        err = (out - want).abs().max().item()
        torch_times, c_times = time_pair(torch_path, c_path, rounds, time.perf_counter)
        times = {"torch SDPA": torch_times, "C chunk kernel": c_times}
        flops = HEADS * DIM * 4 * (n * cached + n * (n + 1) / 2)  # q.k and p.v over the positions each query sees
        row = {"part": "chunk", "cached": cached, "tokens": n, "gflop": flops / 1e9, "max_abs_diff": err}
        for name, ts in times.items():
            row[name] = {"median_us": statistics.median(ts) * 1e6, "gflops_median": flops / statistics.median(ts) / 1e9}
        row["ratio"] = row["torch SDPA"]["median_us"] / row["C chunk kernel"]["median_us"]
        results.append(row)
        print(f"chunk {n:4d} tokens after {cached:5d}: torch {row['torch SDPA']['gflops_median']:6.1f} GFLOP/s, "
              f"C {row['C chunk kernel']['gflops_median']:6.1f}: {row['ratio']:.2f}x (max diff {err:.1e})", flush=True)
    return results


def pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="decode,chunk")
    ap.add_argument("--baseline", type=Path, help="another checkout of fuselm: its decode kernels are compared")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--decode-shapes", default="128x304,64x450,8x1000,1x2000", help="rows x context tokens")
    ap.add_argument("--chunk-shapes", default="0x32,0x128,0x256,0x512,128x128,256x256,400x112",
                    help="cached positions x chunk tokens")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kb = get_kernels()
    assert kb is not None, "the C kernels did not load"
    ka = tree_kernels(args.baseline.resolve()) if args.baseline else None
    print(f"CPU: {machine_info()['cpu_model']}, {args.threads} threads, {kb.isa}, {args.rounds} alternated rounds")
    parts = args.parts.split(",")
    results = []
    if "decode" in parts:
        results += run_decode(ka, kb, args.kinds.split(","), pairs(args.decode_shapes), args.rounds)
    if "chunk" in parts:
        results += run_chunk(kb, pairs(args.chunk_shapes), args.rounds)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "attention_kernels", "machine": machine_info(), "isa": kb.isa,
                                         "threads": args.threads, "baseline": str(args.baseline), "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
