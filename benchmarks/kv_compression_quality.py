"""Quality of KV compression: needle-in-a-haystack retrieval and long-text perplexity, for each
method at budgets of 1/2, 1/4 and 1/8 of the context, against the full cache.

Methods: SnapKV (the engine's defaults: observation window 32, max-pooling over 15; `--snapkv` runs
other settings side by side, e.g. `--snapkv '{}' '{"window": 64}'`), StreamingLLM (4 sinks, the budget as window; `streaming`
with rotary positions in the text, `streaming-cache` in the cache), H2O (the budget split evenly
between heavy hitters and recent tokens, as the paper's experiments do).

Needle: a pass code sentence is put at `--needles` evenly spaced depths ((i + 0.5) / n) of a
filler of real prose (benchmarks/data/public_domain_prose.txt, cut to the context length in
tokens), each needle with its own five-digit code (drawn from `--seed` and the length), and the
prompt ends by asking for it as a sentence to complete ("... The secret pass code is"); a trial
counts when the greedy continuation contains the code. 24 needles make one needle 4.2 points.
Every configuration gets the same prompts; the full cache is the reference. Perplexity: the first `context` tokens of the prose scored with prompt logprobs;
StreamingLLM masks every prompt query to its window, so its perplexity is what it keeps; SnapKV
and H2O compress only at the end of a prompt, so prompt scoring cannot measure them (left out).

    python benchmarks/kv_compression_quality.py --lengths 2048 4096 --methods snapkv --fractions 0.25 --json q.json
    python benchmarks/kv_compression_quality.py --lengths 8000 --needles 8 --methods snapkv --fractions 0.25
    python benchmarks/kv_compression_quality.py --lengths 1024 --needles 2 --fractions 0.25   # quick check

A needle costs about 4 s of prefill at 2k and 8 s at 4k on two EPYC cores, for each configuration.
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
    p.add_argument("--needles", type=int, default=24, help="needles per length, at depths (i + 0.5) / needles")
    p.add_argument("--depths", type=float, nargs="+", default=None, help="explicit needle depths (instead of --needles)")
    p.add_argument("--seed", type=int, default=0, help="draws the pass codes (with the length)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25, 0.125], help="budget / context")
    p.add_argument("--methods", nargs="+", default=["snapkv", "streaming", "h2o"],
                   choices=["snapkv", "streaming", "streaming-cache", "h2o"])
    p.add_argument("--snapkv", nargs="+", default=["{}"],
                   help="SnapKV settings (JSON, besides method and budget) to run side by side; {} = the defaults")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prompt chunk size (a cache-position stream places a chunk's queries as of its start)")
    p.add_argument("--no-perplexity", action="store_true")
    p.add_argument("--no-full-cache", action="store_true", help="leave out the full-cache reference (measured before)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def settings(method: str, budget: int, snapkv: dict) -> dict:
    if method == "snapkv":
        return {"method": "snapkv", "budget": budget, **snapkv}
    if method == "h2o":
        return {"method": "h2o", "budget": budget // 2, "recent": budget - budget // 2}
    positions = "cache" if method == "streaming-cache" else "text"
    return {"method": "streaming", "sink": 4, "window": budget, "positions": positions}


def needle_prompts(tokenizer, prose_ids: list[int], length: int, depths: list[float], seed: int):
    """(prompt ids, code) per depth: `length` tokens of filler with the needle inside, then the question."""
    rng = random.Random(seed * 1_000_003 + length)
    question = tokenizer.encode(QUESTION)
    prompts = []
    for depth in depths:
        code = str(rng.randrange(10000, 100000))
        needle = tokenizer.encode(f" The secret pass code is {code}. Remember it. ")
        filler = prose_ids[:length - len(needle) - len(question)]
        cut = int(len(filler) * depth)
        prompts.append((filler[:cut] + needle + filler[cut:] + question, code))
    return prompts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from fuselm import LLM, SamplingParams
    from fuselm.kernels.build import cpu_model_name

    depths = args.depths or [round((i + 0.5) / args.needles, 4) for i in range(args.needles)]
    snapkv_variants = [json.loads(text) for text in args.snapkv]
    llm = LLM(args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, max_model_len=max(args.lengths) + 64,
              enable_prefix_caching=False, max_num_seqs=min(len(depths), 8),
              **({} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}))
    tokenizer = llm.get_tokenizer()
    prose_ids = tokenizer.encode(PROSE.read_text())
    print(f"CPU: {cpu_model_name()}; model {llm.engine.model_name}; {len(prose_ids)} prose tokens; "
          f"{len(depths)} needles, seed {args.seed}", flush=True)
    configs = [("full", None, {})] * (not args.no_full_cache)
    for method in args.methods:
        for variant in (snapkv_variants if method == "snapkv" else [{}]):
            label = method + ("" if not variant else " " + json.dumps(variant, separators=(",", ":")))
            configs += [(f"{label} 1/{round(1 / f)}", (method, f), variant) for f in args.fractions]
    results = []
    for length in args.lengths:
        prompts = needle_prompts(tokenizer, prose_ids, length, depths, seed=args.seed)
        for name, config, variant in configs:
            compression = None if config is None else settings(config[0], max(32, int(length * config[1])), variant)
            params = SamplingParams(temperature=0, max_tokens=8, kv_compression=compression)
            t0 = time.perf_counter()
            outs = llm.generate([ids for ids, _ in prompts], params, use_tqdm=False)
            answers = [out.outputs[0].text for out in outs]
            hits = [code in answer for answer, (_, code) in zip(answers, prompts)]
            row = {"length": length, "config": name, "kv_compression": compression, "seed": args.seed,
                   "needle_accuracy": sum(hits) / len(hits), "hits_by_depth": dict(zip(map(str, depths), hits)),
                   "misses": {str(d): {"code": code, "answer": a} for d, h, a, (_, code) in zip(depths, hits, answers, prompts)
                              if not h},
                   "seconds": time.perf_counter() - t0}
            if not args.no_perplexity and (config is None or config[0].startswith("streaming")):
                scored = llm.generate([prose_ids[:length]], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                                           kv_compression=compression), use_tqdm=False)[0]
                lps = [lp[t].logprob for lp, t in zip(scored.prompt_logprobs[1:], prose_ids[1:length])]
                row["perplexity"] = math.exp(-sum(lps) / len(lps))
            if config is None:
                full_hits = hits
            elif not args.no_full_cache:  # of the needles the full cache finds, how many this one finds
                row["found_of_full"] = [sum(h and f for h, f in zip(hits, full_hits)), sum(full_hits)]
            results.append(row)
            if args.json:  # after every row, so a long run stopped early keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"cpu": cpu_model_name(), "model": llm.engine.model_name, "results": results}, f, indent=1)
            ppl = f", perplexity {row['perplexity']:.2f}" if "perplexity" in row else ""
            ppl += ", {} of the full cache's {}".format(*row["found_of_full"]) if "found_of_full" in row else ""
            print(f"  {length:5d} tokens {name:>15}: needle {sum(hits)}/{len(hits)} ({100 * row['needle_accuracy']:5.1f}%) "
                  f"{''.join('x' if h else '.' for h in hits)}{ppl} ({row['seconds']:.1f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
