"""Whole-model A/B of the sixteen-row tiles (kernels/int4_rows16.c, int8_rows16.c) against the QuantWeight layout,
in one process.

Two engines on the same GGUF file. For int4 (--bits 4, the default): one built with FUSELM_INT4_TILES=experts
(the dense projections in the QuantWeight layout: quant_rows.c's rows, the dequantised GEMM for prompt chunks of
48 rows and more; MoE experts in tiles, as before the dense tiles), one with the dense projections in tiles too.
For int8 (--bits 8): one with FUSELM_INT8_TILES=0 (no int8 weight in tiles), one with every int8 g32 weight in
tiles. Rounds alternate the engines (both on the fixed rules' choices, FUSELM_KERNEL_CHOICE=rules, so both run
the C layer step); each figure is the process CPU time (all threads; run with --threads 1 for one core's work),
the least over rounds (the machine this was written on is shared and noisy):

    decode b=1     CPU per token of one sequence: (16 + 32 tokens) - (16 + 0), over 32
    decode b=64    CPU per decode step of 64 sequences: 64 x (1 + 8 tokens) - 64 x (1 token), over 8
    prompt 512     CPU of one 512-token prompt (one token out; one 512-token chunk)

    python benchmarks/tiles_model.py [--model PATH.gguf] [--bits 4|8] [--threads 1] [--rounds 3]
                                     [--what decode1,decode64,prompt512]

The default model is the embedded SmolLM2-135M Q4_1; benchmarks/moe.py's llama.cpp files are
.build/moe-bench/mixtral/llama-q4_0.gguf and llama-q8_0.gguf.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fuselm import LLM, SamplingParams
from fuselm.kernels.build import cpu_model_name


def engine(model: str | None, tiles: bool, bits: int) -> LLM:
    # int4: MoE experts are in tiles on both sides; int8: the baseline has no tiles at all
    os.environ[f"FUSELM_INT{bits}_TILES"] = "1" if tiles else ("experts" if bits == 4 else "0")
    os.environ.setdefault("FUSELM_KERNEL_CHOICE", "rules")  # both engines on the C layer step, no timed choice
    llm = LLM(model, dtype="float32", device="cpu", max_num_seqs=64, max_num_batched_tokens=512,
              enable_prefix_caching=False)
    print(f"# tiles={int(tiles)}: {llm.engine.runner.plan.linear}, layers {llm.engine.runner.plan.layers}")
    return llm


def cpu_of(llm: LLM, prompts: list[list[int]], tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    start = time.process_time()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.process_time() - start


def measure(llm: LLM, what: str) -> float:
    """Seconds of CPU for one unit of `what` (a token, a step, a prompt)."""
    if what == "decode1":
        p = [[(11 * i) % 400 + 20 for i in range(16)]]
        return (cpu_of(llm, p, 33) - cpu_of(llm, p, 1)) / 32
    if what == "decode64":
        p = [[(3 * j + 5) % 400 + 20] for j in range(64)]
        return (cpu_of(llm, p, 9) - cpu_of(llm, p, 1)) / 8
    if what == "prompt512":
        return cpu_of(llm, [[(7 * i) % 400 + 20 for i in range(512)]], 1)
    raise ValueError(what)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4, help="which tiles to compare")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--what", default="decode1,decode64,prompt512")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {cpu_model_name()}, {args.threads} thread(s), model {args.model or 'embedded SmolLM2-135M Q4_1'}")
    engines = {"old layout": engine(args.model, False, args.bits), "tiles": engine(args.model, True, args.bits)}
    for what in args.what.split(","):
        best = {name: float("inf") for name in engines}
        for r in range(args.rounds):
            for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
                best[name] = min(best[name], measure(engines[name], what))
        a, b = best["old layout"], best["tiles"]
        print(f"{what:10} old layout {a * 1e3:9.2f} ms   tiles {b * 1e3:9.2f} ms   {a / b:5.2f}x")


if __name__ == "__main__":
    main()
