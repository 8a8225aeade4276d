"""Quality of KV compression: needle-in-a-haystack retrieval and long-text perplexity, for each
method at budgets of 1/2, 1/4 and 1/8 of the context, against the full cache.

Methods: SnapKV (observation window 32), StreamingLLM (4 sinks, the budget as window; `streaming`
with rotary positions in the text, `streaming-cache` in the cache), H2O (the budget split evenly
between heavy hitters and recent tokens, as the paper's experiments do).

Needle: a pass code sentence is put at several depths of a filler of real prose
(benchmarks/data/public_domain_prose.txt, cut to the context length in tokens), and the prompt ends
by asking for it as a sentence to complete ("... The secret pass code is"); a trial counts when the
greedy continuation contains the code. Every configuration gets the same prompts; the full cache is
the reference. Perplexity: the first `context` tokens of the prose scored with prompt logprobs;
StreamingLLM masks every prompt query to its window, so its perplexity is what it keeps; SnapKV
and H2O compress only at the end of a prompt, so prompt scoring cannot measure them (left out).

    python benchmarks/kv_compression_quality.py --lengths 2048 4096 --json quality.json
    python benchmarks/kv_compression_quality.py --lengths 8000 --depths 0.1 0.3 0.5 0.7 0.9 --json quality-8k.json
    python benchmarks/kv_compression_quality.py --lengths 1024 --depths 0.5 --fractions 0.25   # quick check
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

PROSE = Path(__file__).resolve().parent / "data" / "public_domain_prose.txt"
QUESTION = "\n\nWhat was the secret pass code mentioned above? The secret pass code is"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000], help="context tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25, 0.125], help="budget / context")
    p.add_argument("--methods", nargs="+", default=["snapkv", "streaming", "h2o"],
                   choices=["snapkv", "streaming", "streaming-cache", "h2o"])
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prompt chunk size (a cache-position stream places a chunk's queries as of its start)")
    p.add_argument("--no-perplexity", action="store_true")
    p.add_argument("--no-full-cache", action="store_true", help="leave out the full-cache reference (measured before)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def settings(method: str, budget: int) -> dict:
    if method == "snapkv":
        return {"method": "snapkv", "budget": budget, "window": 32}
    if method == "h2o":
        return {"method": "h2o", "budget": budget // 2, "recent": budget - budget // 2}
    positions = "cache" if method == "streaming-cache" else "text"
    return {"method": "streaming", "sink": 4, "window": budget, "positions": positions}


def needle_prompts(tokenizer, prose_ids: list[int], length: int, depths: list[float], seed: int):
    """(prompt ids, code) per depth: `length` tokens of filler with the needle inside, then the question."""
    rng = random.Random(seed)
    question = tokenizer.encode(QUESTION)
    prompts = []
    for depth in depths:
        code = str(rng.randrange(10000, 99999))
        needle = tokenizer.encode(f" The secret pass code is {code}. Remember it. ")
        filler = prose_ids[:length - len(needle) - len(question)]
        cut = int(len(filler) * depth)
        prompts.append((filler[:cut] + needle + filler[cut:] + question, code))
    return prompts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from fuselm import LLM, SamplingParams
    from fuselm.kernels.build import cpu_model_name

    llm = LLM(args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, max_model_len=max(args.lengths) + 64,
              enable_prefix_caching=False, max_num_seqs=len(args.depths),
              **({} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}))
    tokenizer = llm.get_tokenizer()
    prose_ids = tokenizer.encode(PROSE.read_text())
    print(f"CPU: {cpu_model_name()}; model {llm.engine.model_name}; {len(prose_ids)} prose tokens", flush=True)
    configs = [("full", None)] * (not args.no_full_cache) + [(f"{m} 1/{round(1 / f)}", (m, f)) for m in args.methods for f in args.fractions]
    results = []
    for length in args.lengths:
        prompts = needle_prompts(tokenizer, prose_ids, length, args.depths, seed=length)
        for name, config in configs:
            compression = None if config is None else settings(config[0], max(32, int(length * config[1])))
            params = SamplingParams(temperature=0, max_tokens=8, kv_compression=compression)
            t0 = time.perf_counter()
            outs = llm.generate([ids for ids, _ in prompts], params, use_tqdm=False)
            hits = [code in out.outputs[0].text for out, (_, code) in zip(outs, prompts)]
            row = {"length": length, "config": name, "kv_compression": compression,
                   "needle_accuracy": sum(hits) / len(hits), "hits_by_depth": dict(zip(map(str, args.depths), hits)),
                   "seconds": time.perf_counter() - t0}
            if not args.no_perplexity and (config is None or config[0].startswith("streaming")):
                scored = llm.generate([prose_ids[:length]], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                                           kv_compression=compression), use_tqdm=False)[0]
                lps = [lp[t].logprob for lp, t in zip(scored.prompt_logprobs[1:], prose_ids[1:length])]
                row["perplexity"] = math.exp(-sum(lps) / len(lps))
            results.append(row)
            if args.json:  # after every row, so a long run stopped early keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"cpu": cpu_model_name(), "model": llm.engine.model_name, "results": results}, f, indent=1)
            ppl = f", perplexity {row['perplexity']:.2f}" if "perplexity" in row else ""
            print(f"  {length:5d} tokens {name:>15}: needle {100 * row['needle_accuracy']:5.1f}% "
                  f"{''.join('x' if h else '.' for h in hits)}{ppl} ({row['seconds']:.1f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
