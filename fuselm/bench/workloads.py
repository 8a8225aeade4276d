"""Benchmark workloads: seeded lists of requests whose prompts are windows of real text.

Throughput and latency figures only compare across engines, servers and commits when every run
sends the very same requests. Each generator here turns (the token ids of a text, a request count,
a seed, a few shape parameters) into a list of Request(prompt token ids, output length), drawing
every random number from one `random.Random(seed)`, so a seed always gives the same list.

Prompts are cut from real prose (benchmarks/data/public_domain_prose.txt, tokenised with the
target model's tokenizer) rather than random token ids: real text gives realistic attention and
tokenizer behaviour, and prefix caching only sees the sharing a workload puts there on purpose.
A window longer than what is left of the text wraps round to its start.

The `random` generator draws exactly as benchmarks/offline_throughput.py's make_workload does
(prompt length, output length, start offset, per request), so with the same seed, tokenizer and
ranges it gives the same requests as that script.
"""

from __future__ import annotations

import inspect
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEXT = REPO_ROOT / "benchmarks" / "data" / "public_domain_prose.txt"

Range = tuple[int, int]


@dataclass(frozen=True)
class Request:
    """One benchmark request: the prompt's token ids and how many tokens to generate (ignore_eos)."""

    prompt: list[int]
    output_len: int
    kind: str = ""  # "short", "long", "group-3", ...: which part of the workload it belongs to

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


def load_text(path: str | Path | None = None) -> str:
    """The benchmark text (default: benchmarks/data/public_domain_prose.txt of this checkout)."""
    path = Path(path) if path is not None else DEFAULT_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"benchmark text {path} not found; pass --text with a plain-text file "
                                "(the default lives in benchmarks/data/ of the fuselm source tree)")
    return path.read_text(encoding="utf-8")


# ---- helpers --------------------------------------------------------------------------------------


def _check_range(name: str, r: Range) -> Range:
    lo, hi = int(r[0]), int(r[1])
    if lo < 1 or hi < lo:
        raise ValueError(f"{name} must be a range MIN:MAX with 1 <= MIN <= MAX, got {lo}:{hi}")
    return lo, hi


def _window(text_ids: list[int], start: int, length: int) -> list[int]:
    """`length` tokens of the text from `start`, wrapping round to the beginning when needed."""
    out = text_ids[start:start + length]
    while len(out) < length:
        out += text_ids[:length - len(out)]
    return out


def _random_window(rng: random.Random, text_ids: list[int], length: int) -> list[int]:
    return _window(text_ids, rng.randrange(len(text_ids)), length)


def _lognormal_len(rng: random.Random, median: float, sigma: float, bounds: Range) -> int:
    """A length from a log-normal with this median and log-space sigma, rounded and clipped to bounds."""
    value = round(median * math.exp(rng.gauss(0.0, sigma)))
    return min(max(value, bounds[0]), bounds[1])


def _need_text(text_ids: list[int]) -> None:
    if not text_ids:
        raise ValueError("the benchmark text tokenised to nothing; pass a non-empty text")


# ---- the workloads --------------------------------------------------------------------------------


def random_workload(text_ids: list[int], num_requests: int, seed: int = 0, input_len: Range = (32, 512),
                    output_len: Range = (32, 256)) -> list[Request]:
    """Prompt and output lengths uniform in the given ranges (both ends included)."""
    _need_text(text_ids)
    input_len, output_len = _check_range("input_len", input_len), _check_range("output_len", output_len)
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        plen = rng.randint(*input_len)
        olen = rng.randint(*output_len)
        if plen <= len(text_ids):  # offline_throughput.py's draw, so both give the same requests
            prompt = text_ids[(start := rng.randint(0, len(text_ids) - plen)):start + plen]
        else:
            prompt = _random_window(rng, text_ids, plen)
        requests.append(Request(prompt, olen, "random"))
    return requests


def chat_workload(text_ids: list[int], num_requests: int, seed: int = 0, input_median: float = 96.0,
                  input_sigma: float = 1.0, input_len: Range = (4, 1024), output_median: float = 128.0,
                  output_sigma: float = 0.8, output_len: Range = (4, 512)) -> list[Request]:
    """Synthetic ShareGPT-like chat: log-normal prompt and output lengths (most short, a long tail),
    clipped to input_len / output_len."""
    _need_text(text_ids)
    input_len, output_len = _check_range("input_len", input_len), _check_range("output_len", output_len)
    if min(input_median, output_median) <= 0 or min(input_sigma, output_sigma) < 0:
        raise ValueError("medians must be > 0 and sigmas >= 0")
    rng = random.Random(seed)
    return [_chat_request(rng, text_ids, input_median, input_sigma, input_len, output_median, output_sigma,
                          output_len) for _ in range(num_requests)]


def _chat_request(rng: random.Random, text_ids: list[int], input_median: float, input_sigma: float,
                  input_len: Range, output_median: float, output_sigma: float, output_len: Range) -> Request:
    plen = _lognormal_len(rng, input_median, input_sigma, input_len)
    olen = _lognormal_len(rng, output_median, output_sigma, output_len)
    return Request(_random_window(rng, text_ids, plen), olen, "short")


def shared_prefix_workload(text_ids: list[int], num_requests: int, seed: int = 0, num_groups: int = 8,
                           prefix_len: int = 1000, question_len: Range = (16, 64),
                           output_len: Range = (32, 128)) -> list[Request]:
    """num_groups groups, each sharing one long system prompt (prefix_len tokens) followed by a short
    unique question; requests are dealt round-robin to the groups, then shuffled (so the groups
    interleave). --num-requests 256 with the defaults gives 8 groups x 32 requests."""
    _need_text(text_ids)
    question_len, output_len = _check_range("question_len", question_len), _check_range("output_len", output_len)
    if num_groups < 1 or prefix_len < 1:
        raise ValueError("num_groups and prefix_len must be >= 1")
    rng = random.Random(seed)
    prefixes = [_random_window(rng, text_ids, prefix_len) for _ in range(num_groups)]
    requests = []
    for i in range(num_requests):
        group = i % num_groups
        question = _random_window(rng, text_ids, rng.randint(*question_len))
        requests.append(Request(prefixes[group] + question, rng.randint(*output_len), f"group-{group}"))
    rng.shuffle(requests)
    return requests


def long_prompt_workload(text_ids: list[int], num_requests: int, seed: int = 0, num_long: int = -1,
                         long_len: Range = (1000, 3000), long_output_len: Range = (32, 128),
                         input_median: float = 96.0, input_sigma: float = 1.0, input_len: Range = (4, 512),
                         output_median: float = 128.0, output_sigma: float = 0.8,
                         output_len: Range = (4, 512)) -> list[Request]:
    """Mostly short chat requests (as in `chat`) with num_long long prompts (long_len tokens) placed
    at evenly spaced positions inside the sequence, so they arrive while short requests are running.
    num_long = -1 means one long prompt per 16 requests (at least one)."""
    _need_text(text_ids)
    long_len = _check_range("long_len", long_len)
    long_output_len = _check_range("long_output_len", long_output_len)
    input_len, output_len = _check_range("input_len", input_len), _check_range("output_len", output_len)
    if num_long < 0:
        num_long = max(1, num_requests // 16) if num_requests else 0
    if num_long > num_requests:
        raise ValueError(f"num_long ({num_long}) exceeds the number of requests ({num_requests})")
    rng = random.Random(seed)
    long_at = {(j + 1) * num_requests // (num_long + 1) for j in range(num_long)}
    if len(long_at) < num_long:  # only when nearly every request is long: fill the remaining slots
        long_at |= set(sorted(set(range(num_requests)) - long_at)[:num_long - len(long_at)])
    requests = []
    for i in range(num_requests):
        if i in long_at:
            prompt = _random_window(rng, text_ids, rng.randint(*long_len))
            requests.append(Request(prompt, rng.randint(*long_output_len), "long"))
        else:
            requests.append(_chat_request(rng, text_ids, input_median, input_sigma, input_len, output_median,
                                          output_sigma, output_len))
    return requests


WORKLOADS: dict[str, Callable[..., list[Request]]] = {
    "random": random_workload,
    "chat": chat_workload,
    "shared-prefix": shared_prefix_workload,
    "long-prompt": long_prompt_workload,
}
_FIXED = ("text_ids", "num_requests", "seed")


def workload_options(name: str) -> dict[str, object]:
    """The tunable parameters of workload `name` and their defaults."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}")
    params = inspect.signature(WORKLOADS[name]).parameters
    return {k: p.default for k, p in params.items() if k not in _FIXED}


def _format(value: object) -> str:
    return f"{value[0]}:{value[1]}" if isinstance(value, tuple) else str(value)


def describe_workloads() -> str:
    """One line per workload listing its KEY=DEFAULT options (for --help)."""
    lines = []
    for name in WORKLOADS:
        opts = " ".join(f"{k}={_format(v)}" for k, v in workload_options(name).items())
        lines.append(f"{name}: {opts}")
    return "\n".join(lines)


def parse_workload_args(name: str, pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE strings -> keyword arguments for workload `name`, typed after the defaults
    (ranges are MIN:MAX, or one number for a fixed length)."""
    defaults = workload_options(name)
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in defaults:
            raise ValueError(f"bad workload option {pair!r}; {name} takes KEY=VALUE with KEY one of "
                             f"{sorted(defaults)}")
        default = defaults[key]
        try:
            if isinstance(default, tuple):
                lo, _, hi = raw.partition(":")
                out[key] = (int(lo), int(hi or lo))
            else:
                out[key] = type(default)(raw)
        except ValueError:
            raise ValueError(f"workload option {key} needs {'MIN:MAX' if isinstance(default, tuple) else type(default).__name__}"
                             f", got {raw!r}") from None
    return out


def make_workload(name: str, text_ids: list[int], num_requests: int, seed: int = 0,
                  **options: object) -> list[Request]:
    """Build workload `name` (see WORKLOADS) with the given options."""
    unknown = set(options) - set(workload_options(name))
    if unknown:
        raise ValueError(f"workload {name} has no option(s) {sorted(unknown)}; it takes {sorted(workload_options(name))}")
    if num_requests < 1:
        raise ValueError("--num-requests must be >= 1")
    return WORKLOADS[name](list(text_ids), num_requests, seed, **options)


def summarize(requests: list[Request]) -> dict:
    """Counts and totals of a workload (for reports)."""
    plens = [r.prompt_len for r in requests]
    olens = [r.output_len for r in requests]
    kinds: dict[str, int] = {}
    for r in requests:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return {"num_requests": len(requests), "prompt_tokens": sum(plens), "output_tokens": sum(olens),
            "prompt_len_min": min(plens, default=0), "prompt_len_max": max(plens, default=0),
            "output_len_min": min(olens, default=0), "output_len_max": max(olens, default=0), "kinds": kinds}
