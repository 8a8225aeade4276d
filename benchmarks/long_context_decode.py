"""Decode speed at long context: output tok/s of a batch of long prompts once their prefill is done,
for each KV cache configuration (float32 / int8 KV, KV compression methods).

Every configuration gets the same seeded random prompts (distinct, so no prefix is shared and each
sequence's context is its own memory), is prefilled (not timed), then runs `--steps` decode steps
with every sequence in the batch; the figure is batch x steps / seconds of those steps. Decode
attention reads each sequence's whole cache every step, so at 4k-8k tokens it is bound by the
bytes read: an int8 cache reads ~4x fewer than float32, a compressed one only what it kept.

    python benchmarks/long_context_decode.py --context 4096 --batch 8 16 32
    python benchmarks/long_context_decode.py --context 8192 --batch 8 \\
        --config fp32 '{}' --config snapkv-1/4 '{"kv_compression": {"method": "snapkv", "budget": 2048}}'
    python benchmarks/long_context_decode.py --context 8000 --batch 8 \
        --config h2o-1/4 '{"kv_compression": {"method": "h2o", "budget": 1000, "recent": 1000}}'

An H2O configuration pays its scoring pass in the timed steps (a second read of each kept key per
layer and step) and in the prefill (one more q.k product over the prompt).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time


DEFAULT_CONFIGS = [("fp32-kv", {"kv_cache_dtype": "float32"}), ("int8-kv", {"kv_cache_dtype": "int8"})]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--context", type=int, default=4096, help="prompt tokens of every sequence")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--steps", type=int, default=16, help="timed decode steps")
    p.add_argument("--config", nargs=2, action="append", metavar=("NAME", "ENGINE_OPTIONS_JSON"),
                   help="a configuration to run (repeatable; default: float32 and int8 KV)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def decode_rate(options: dict, model: str | None, dtype: str, context: int, batch: int, steps: int) -> dict:
    from fuselm import LLM, SamplingParams

    rng = random.Random(context * 1000 + batch)
    # the first sequences decode while the later ones prefill: leave them room for it
    room = steps + 16 + 2 * -(-batch * context // 2048)
    llm = LLM(model, dtype=dtype, max_model_len=context + room, max_num_seqs=batch, enable_prefix_caching=False,
              max_num_batched_tokens=2048, **options)
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=room, ignore_eos=True)
    for i in range(batch):
        engine.add_request(str(i), [rng.randrange(100, vocab - 100) for _ in range(context)], params)
    t0 = time.perf_counter()
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.num_waiting:
        engine.step()
    prefill_s = time.perf_counter() - t0
    assert len(engine.scheduler.running) == batch, "the KV cache does not hold the whole batch"
    used_blocks = engine.runner.num_blocks - engine.kv.num_free_blocks
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = time.perf_counter() - t0
    result = {"batch": batch, "context": context, "tok_s": batch * steps / seconds, "step_ms": 1000 * seconds / steps,
              "prefill_s": prefill_s, "kv_blocks_used": used_blocks, "plan": engine.runner.plan.summary()}
    del llm, engine
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from fuselm.kernels.build import cpu_model_name

    configs = [(name, json.loads(text)) for name, text in args.config] if args.config else DEFAULT_CONFIGS
    print(f"CPU: {cpu_model_name()}; context {args.context}, {args.steps} decode steps", flush=True)
    results = []
    for batch in args.batch:
        for name, options in configs:
            r = decode_rate(options, args.model, args.dtype, args.context, batch, args.steps)
            r["config"] = name
            results.append(r)
            print(f"  batch {batch:3d} {name:>14}: {r['tok_s']:8.1f} tok/s ({r['step_ms']:.1f} ms/step; "
                  f"prefill {r['prefill_s']:.1f} s; {r['kv_blocks_used']} KV blocks)", flush=True)
        base = next(r for r in results if r["batch"] == batch and r["config"] == configs[0][0])
        for r in results:
            if r["batch"] == batch and r is not base:
                print(f"  batch {batch:3d} {r['config']:>14} / {configs[0][0]}: {r['tok_s'] / base['tok_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
