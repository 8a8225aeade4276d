"""Expert parallelism's two measured choices (docs/parallel.md):

`comm`: per MoE layer on 2 gloo ranks of this machine, what moving tokens costs. fuselm's form is one
all-reduce of the [T, hidden] partial outputs (every rank already holds every token after attention's
all-reduce); the all-to-all form splits the tokens over the ranks, exchanges the counts, sends each
(token, slot) row to the rank of its expert, sends the results back, and all-gathers the outputs so
attention's tensor-parallel ranks hold every token again. Median milliseconds over repetitions, the
Mixtral-like shape of benchmarks/moe.py (hidden 1024, 32 experts, top-4), uniform routing.

`placement`: a skewed routing workload: a random MoE model (32 experts, top-4, 4 layers) run on
prompts drawn from a narrow, Zipf-distributed slice of the vocabulary, its routing recorded
(LLM.dump_expert_stats), `fuselm placement` solved for 2 and 4 ranks, and the max/mean rank load of
round-robin and of the placement, on the recorded workload and on a held-out one of the same kind.

    .venv/bin/python benchmarks/expert_parallel.py comm
    .venv/bin/python benchmarks/expert_parallel.py placement
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN, EXPERTS, TOP_K = 1024, 32, 4
TOKENS = (1, 8, 32, 128, 512)


def _all_reduce_form(x: torch.Tensor) -> None:
    dist.all_reduce(x)


def _all_to_all_form(x: torch.Tensor, ids: torch.Tensor, rank: int, world: int) -> None:
    t = x.shape[0]
    mine = slice(rank * t // world, (rank + 1) * t // world)  # the tokens this rank dispatches
    owner = ids[mine] % world  # [t', k]: the rank of each slot's expert
    token = torch.arange(mine.start, mine.stop).unsqueeze(1).expand_as(owner)  # [t', k]
    order = torch.argsort(owner.reshape(-1), stable=True)
    send = x[token.reshape(-1)[order]]  # [t' * k, H] grouped by destination
    send_counts = torch.bincount(owner.reshape(-1), minlength=world)  # [world]
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    recv = x.new_empty(int(recv_counts.sum()), x.shape[1])
    dist.all_to_all_single(recv, send, recv_counts.tolist(), send_counts.tolist())  # dispatch
    back = torch.empty_like(send)
    dist.all_to_all_single(back, recv, send_counts.tolist(), recv_counts.tolist())  # combine (experts' outputs)
    local = x[mine].contiguous()
    parts = [torch.empty_like(local) for _ in range(world)] if t % world == 0 else None
    if parts is not None:
        dist.all_gather(parts, local)  # every rank holds every token again
    else:
        dist.all_reduce(x)  # uneven split: the all-gather written as a sum of zero-padded parts


def _comm_rank(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    for t in TOKENS:
        gen = torch.Generator().manual_seed(t)
        ids = torch.rand(t, EXPERTS, generator=gen).topk(TOP_K, dim=-1).indices  # [T, k], the same on each rank
        x = torch.randn(t, HIDDEN, generator=gen)
        timings = {}
        for name, form in (("all_reduce", lambda: _all_reduce_form(x.clone())),
                           ("all_to_all", lambda: _all_to_all_form(x.clone(), ids, rank, world))):
            samples = []
            for i in range(repeats + 3):
                dist.barrier()
                t0 = time.perf_counter()
                form()
                if i >= 3:
                    samples.append(time.perf_counter() - t0)
            timings[name] = statistics.median(samples) * 1e3
        rows.append({"tokens": t, **timings})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def comm(repeats: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "comm.json")
        mp.spawn(_comm_rank, args=(2, port, repeats, out), nprocs=2)
        rows = json.loads(Path(out).read_text())
    print(f"2 gloo ranks, hidden {HIDDEN}, {EXPERTS} experts top-{TOP_K}, float32; median ms per MoE layer")
    print(f"{'tokens':>6}  {'all-reduce':>10}  {'all-to-all':>10}")
    for r in rows:
        print(f"{r['tokens']:>6}  {r['all_reduce']:>10.3f}  {r['all_to_all']:>10.3f}")


def skewed_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """Prompts over 24 tokens of the vocabulary, Zipf-distributed: a narrow domain."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.arange(5, 29)
    weights = 1.0 / torch.arange(1, 25, dtype=torch.float64) ** 1.2
    return [tokens[torch.multinomial(weights, length, replacement=True, generator=gen)].tolist() for _ in range(count)]


def record(path: str, seed: int, out: Path) -> dict:
    from fuselm import LLM, SamplingParams

    llm = LLM(path, dtype="float32", device="cpu", enable_prefix_caching=False)
    llm.generate(skewed_prompts(48, 64, seed), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                 use_tqdm=False)
    return llm.dump_expert_stats(out)


def placement() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from moe_models import make_tiny_moe

    from fuselm.parallel.placement import max_over_mean, solve_placement

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "moe"
        make_tiny_moe(model, "mixtral", seed=5, layers=4, hidden=256, num_experts=EXPERTS, top_k=TOP_K,
                      expert_intermediate=128)
        seen = record(str(model), 1, Path(tmp) / "seen.json")
        held_out = record(str(model), 2, Path(tmp) / "held_out.json")
    loads = torch.tensor(seen["load"], dtype=torch.float64)
    print(f"skewed workload: 48 prompts x 64 tokens over 24 Zipf-weighted tokens, 16 generated each; "
          f"{seen['tokens']} tokens routed, {EXPERTS} experts top-{TOP_K}, {len(seen['layers'])} MoE layers")
    print("hottest expert / mean expert per layer: "
          + ", ".join(f"{(row.max() / row.mean()).item():.2f}" for row in loads))
    for ranks in (2, 4):
        t0 = time.perf_counter()
        report = solve_placement(seen, ranks)
        seconds = time.perf_counter() - t0
        placed = [report.placement.owners[i] for i in seen["layers"]]
        rr = [[e % ranks for e in range(EXPERTS)]] * len(placed)
        print(f"{ranks} ranks: max/mean rank load (sum over layers of the most loaded rank / even share): "
              f"recorded round-robin {report.before:.3f} -> placed {report.after:.3f}; held-out round-robin "
              f"{max_over_mean(held_out['load'], rr, ranks):.3f} -> placed "
              f"{max_over_mean(held_out['load'], placed, ranks):.3f}; cross-rank pairs {report.traffic_before:.0f} "
              f"-> {report.traffic_after:.0f}; solved in {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["comm", "placement"])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes on the cores skew every figure)")
    comm(args.repeats) if args.part == "comm" else placement()
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
