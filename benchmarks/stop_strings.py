"""How much a large stop-string list costs the engine per generated token.

A request may carry many stop strings; every generated token is checked against all of them and
every streamed output holds back the tail a stop string could still complete. This runs the
embedded model on one prompt with `n` samples, `--num-stops` random stop strings (that the text
will not contain, so every token pays the full check) and `--max-tokens` tokens each, and prints
the wall time of the whole generate call and of the same call without stop strings, and the CPU
time the engine thread spent in the stop-string check and hold-back (the engine's
find_stop_string and visible_text, timed in place), which a loaded machine does not blur.

    python benchmarks/stop_strings.py                       # 100,000 stop strings, n=16, 24 tokens
    python benchmarks/stop_strings.py --num-stops 1000
"""

from __future__ import annotations

import argparse
import random
import string
import time
from collections.abc import Callable

import fuselm.engine.engine as engine_module
from fuselm import LLM, SamplingParams

STOP_CHECKS = ("find_stop_string", "visible_text")


class CpuTimer:
    """Accumulates the thread CPU time of the wrapped functions."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start
                self.calls += 1
        return timed


def random_stops(count: int, seed: int) -> list[str]:
    """Distinct strings of 6 to 12 lowercase letters and digits: a large, branching trie."""
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + string.digits
    stops: set[str] = set()
    while len(stops) < count:
        stops.add("".join(rng.choices(alphabet, k=rng.randint(6, 12))))
    return sorted(stops)


def timed_generate(llm: LLM, prompt: str, params: SamplingParams) -> tuple[float, int]:
    start = time.perf_counter()
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    return time.perf_counter() - start, sum(len(c.token_ids) for c in out.outputs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-stops", type=int, default=100_000)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    llm = LLM()
    prompt = "Write a short story about a lighthouse keeper."
    base = dict(n=args.n, max_tokens=args.max_tokens, temperature=0.8, seed=args.seed, ignore_eos=True)
    stops = random_stops(args.num_stops, args.seed)
    timer = CpuTimer()
    for name in STOP_CHECKS:
        setattr(engine_module, name, timer.wrap(getattr(engine_module, name)))
    timed_generate(llm, prompt, SamplingParams(**base))  # warm-up
    plain_s, plain_tokens = timed_generate(llm, prompt, SamplingParams(**base))
    build_start = time.perf_counter()
    params = SamplingParams(**base, stop=stops)
    build_s = time.perf_counter() - build_start
    timer.seconds, timer.calls = 0.0, 0
    stop_s, stop_tokens = timed_generate(llm, prompt, params)
    print(f"without stop strings: {plain_s:.2f} s for {plain_tokens} tokens")
    print(f"SamplingParams with {len(stops):,} stop strings: {build_s:.2f} s to build")
    print(f"with {len(stops):,} stop strings: {stop_s:.2f} s for {stop_tokens} tokens, of which "
          f"{timer.seconds:.3f} s CPU in {timer.calls} stop checks and hold-backs "
          f"({timer.seconds / max(stop_tokens, 1) * 1e6:.1f} us per token)")


if __name__ == "__main__":
    main()
