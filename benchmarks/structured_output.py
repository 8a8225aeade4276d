"""What structured output costs: decode tok/s with a JSON schema against unconstrained, and TTFT.

On the embedded model (SmolLM2-135M-Instruct, Q4_1 GGUF):

- decode throughput at batch 1 and 32 (greedy and temperature 1): the engine is driven step by
  step; once every request has its first token, `--steps` steps are timed in which all rows
  decode. The schema (an array of at least 4 objects of a typical shape: strings with a pattern
  and a length bound, bounded integers, an enum array, a nested object) forces outputs longer than
  the window, and unconstrained requests ignore EOS, so the batch stays full in both runs;
- the engine thread's CPU time in the grammar work inside that window: filling bitmasks
  (SequenceGrammar.token_bitmask), advancing matchers (accept) and the batched mask op
  (apply_token_constraints), which a loaded machine does not blur the way it blurs wall time;
- cold compile of the typical schema (parse + compile against the vocabulary, median of runs
  with distinct schemas) and time to first token of one request alone: unconstrained, with a
  schema never seen (compile included), and with the same schema again (cached).

    python benchmarks/structured_output.py                   # writes benchmarks/results/structured-output-<cpu>.json
    python benchmarks/structured_output.py --steps 16 --no-save
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import time
from pathlib import Path

import fuselm.engine.structured_output as so_module
import fuselm.runner.sampler as sampler_module
from fuselm import LLM, SamplingParams
from fuselm.bench.report import cpu_model

TYPICAL = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.com$"},
        "tags": {"type": "array", "items": {"enum": ["friend", "family", "work"]}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 40},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
LONG = {"type": "array", "items": TYPICAL, "minItems": 4, "maxItems": 8}
PROMPT = [{"role": "user", "content": "List a few people you might know, with their contact details, as JSON."}]


class CpuTimer:
    """Thread CPU time spent in the wrapped functions."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start
        return timed


def install_timers() -> dict[str, CpuTimer]:
    timers = {"bitmask_fill": CpuTimer(), "matcher_accept": CpuTimer(), "mask_apply": CpuTimer()}
    grammar = so_module.SequenceGrammar
    grammar.token_bitmask = timers["bitmask_fill"].wrap(grammar.token_bitmask)
    grammar.accept = timers["matcher_accept"].wrap(grammar.accept)
    sampler_module.apply_token_constraints = timers["mask_apply"].wrap(sampler_module.apply_token_constraints)
    return timers


def decode_rate(llm: LLM, prompt: str, batch: int, temperature: float, schema: dict | None, steps: int,
                timers: dict[str, CpuTimer]) -> dict:
    """tok/s over `steps` steps in which all `batch` rows decode, and the grammar's CPU time in them."""
    engine = llm.engine
    for i in range(batch):
        params = SamplingParams(temperature=temperature, seed=i, max_tokens=1000, ignore_eos=schema is None,
                                structured_outputs=None if schema is None else {"json": schema})
        engine.add_request(f"bench-{batch}-{temperature}-{schema is not None}-{i}", prompt, params)
    group = list(engine.groups.values())
    while any(r.num_output_tokens == 0 for g in group for r in g):
        engine.step()
    before = sum(r.num_output_tokens for g in group for r in g)
    for timer in timers.values():
        timer.seconds = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = time.perf_counter() - start
    tokens = sum(r.num_output_tokens for g in group for r in g) - before
    full = all(not r.is_finished for g in group for r in g)
    for rid in list(engine.groups):
        engine.abort_request(rid)
    return {"batch": batch, "temperature": temperature, "constrained": schema is not None,
            "tokens_per_s": tokens / seconds, "step_ms": 1000 * seconds / steps, "batch_stayed_full": full,
            "grammar_cpu_ms_per_step": {k: 1000 * t.seconds / steps for k, t in timers.items()}}


def cold_compile_ms(llm: LLM, runs: int) -> list[float]:
    """Parse + compile of the typical schema made distinct per run (so nothing is cached)."""
    manager = llm.engine.structured
    manager._get_compiler()  # vocabulary info is a one-off at the first structured request, timed apart
    times = []
    for i in range(runs):
        schema = copy.deepcopy(TYPICAL)
        schema["properties"]["name"]["maxLength"] = 41 + i
        spec = so_module.StructuredOutputsParams(json=schema)
        start = time.perf_counter()
        manager._compile(so_module.parse_spec(spec))
        times.append(1000 * (time.perf_counter() - start))
    return times


def ttft_ms(llm: LLM, prompt: str, schema: dict | None) -> float:
    params = SamplingParams(temperature=0, max_tokens=1, structured_outputs=None if schema is None else {"json": schema})
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    return 1000 * (out.metrics.first_token_time - out.metrics.arrival_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per configuration")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--compile-runs", type=int, default=7)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    llm = LLM()
    prompt = llm.engine.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    first = time.perf_counter()
    ttft_ms(llm, prompt, {"type": "object", "properties": {"warm": {"type": "integer"}}})
    first_request_s = time.perf_counter() - first  # xgrammar import + vocabulary info + a compile + a step
    timers = install_timers()

    compile_times = cold_compile_ms(llm, args.compile_runs)
    ttft = {"unconstrained": [], "cold_schema": [], "cached_schema": []}
    for i in range(3):
        schema = copy.deepcopy(TYPICAL)
        schema["properties"]["age"]["maximum"] = 200 + i  # a schema not seen before
        ttft["unconstrained"].append(ttft_ms(llm, prompt, None))
        ttft["cold_schema"].append(ttft_ms(llm, prompt, schema))
        ttft["cached_schema"].append(ttft_ms(llm, prompt, schema))

    rows = []
    for batch in args.batches:
        for temperature in (0.0, 1.0):
            plain = decode_rate(llm, prompt, batch, temperature, None, args.steps, timers)
            constrained = decode_rate(llm, prompt, batch, temperature, LONG, args.steps, timers)
            slowdown = 1 - constrained["tokens_per_s"] / plain["tokens_per_s"]
            rows += [plain, constrained]
            print(f"batch {batch:>2} T={temperature}: unconstrained {plain['tokens_per_s']:7.1f} tok/s, "
                  f"JSON schema {constrained['tokens_per_s']:7.1f} tok/s ({100 * slowdown:+.1f}% slower); "
                  f"grammar CPU ms/step {constrained['grammar_cpu_ms_per_step']}")

    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, load average {load_before:.1f} before / "
                   f"{os.getloadavg()[0]:.1f} after",
        "model": "embedded SmolLM2-135M-Instruct Q4_1 GGUF",
        "command": f"benchmarks/structured_output.py --steps {args.steps}",
        "first_structured_request_s": first_request_s,
        "cold_compile_ms": {"median": statistics.median(compile_times), "runs": compile_times},
        "ttft_ms": {k: {"median": statistics.median(v), "runs": v} for k, v in ttft.items()},
        "decode": rows,
        "seconds": time.perf_counter() - start,
    }
    print(f"cold compile of the typical schema: median {result['cold_compile_ms']['median']:.1f} ms; "
          f"TTFT ms (median): " + ", ".join(f"{k} {v['median']:.1f}" for k, v in result["ttft_ms"].items())
          + f"; first structured request after start {first_request_s:.2f} s")
    if not args.no_save:
        slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
        path = Path(__file__).parent / "results" / f"structured-output-{slug}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    main()
