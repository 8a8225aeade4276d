"""Serving-benchmark metrics from per-request records: exact, pure functions, no I/O.

Kept apart from the HTTP client so the arithmetic behind every reported number can be tested
against hand-computed values, and so the same definitions apply whichever server was measured.
The figures are the ones vLLM's serving benchmark reports, defined as follows (all latencies
are over successful requests only; failed requests are counted and otherwise ignored):

- TTFT: first token's arrival - send time.
- E2EL (end-to-end latency): last token's arrival - send time.
- TPOT (time per output token, per request): (E2EL - TTFT) / (output tokens - 1); requests with
  fewer than 2 output tokens have no TPOT (they are left out of TPOT statistics and meet any TPOT
  bound of an SLO).
- ITL (inter-token latency): every gap between consecutive tokens of a request, pooled over all
  requests. A streamed chunk that carries k tokens gives k samples: the gap since the previous
  chunk for its first token and 0 for the other k - 1 (see token_times_from_chunks). So a request
  with n tokens gives n - 1 samples, and their mean is exactly that request's TPOT.
- Percentiles use linear interpolation between closest ranks (numpy's default, Hyndman-Fan type
  7): for sorted x[0..n-1], the p-th percentile is x[i] + f * (x[i+1] - x[i]) with i + f =
  (n - 1) * p / 100. The median is the 50th percentile; std is the population standard deviation.
- Throughputs divide by the benchmark duration: requests/s counts successful requests, output
  tok/s their output tokens, total tok/s their prompt + output tokens.
- Goodput: successful requests that meet every bound of the SLO, per second of duration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


@dataclass
class RequestRecord:
    """What the client saw of one request. Times are seconds on one monotonic clock."""

    send_time: float
    token_times: list[float] = field(default_factory=list)  # one arrival time per output token
    end_time: float | None = None  # last token's arrival (or when it failed)
    prompt_tokens: int = 0
    output_tokens: int = 0
    success: bool = False
    error: str = ""
    num_chunks: int = 0  # streamed chunks that carried tokens
    expected_output_tokens: int | None = None  # what the request asked for (max_tokens with ignore_eos)

    @property
    def first_token_time(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.send_time if self.token_times else None

    @property
    def e2el(self) -> float | None:
        return self.end_time - self.send_time if self.end_time is not None else None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or self.ttft is None or self.e2el is None:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


def token_times_from_chunks(chunks: list[tuple[float, int]], total_tokens: int | None = None) -> list[float]:
    """Per-token arrival times from streamed chunks given as (arrival time, tokens it carried).

    A chunk carrying k tokens contributes its arrival time k times. Servers often do not say how many
    tokens a chunk carried (an OpenAI completion chunk has only text), and the client then counts 1
    per chunk; when the final usage reports more tokens (`total_tokens`) than were counted, the
    missing tokens are placed at the last chunk's time. Where they really arrived does not matter to
    any statistic: either way the request's ITL samples are the gaps between chunks plus one 0 per
    extra token, and TTFT, E2EL and TPOT depend only on the first and last chunk.
    """
    times: list[float] = []
    for arrival, count in chunks:
        times.extend([arrival] * count)
    if total_tokens is not None and total_tokens > len(times) and times:
        times.extend([times[-1]] * (total_tokens - len(times)))
    return times


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile (0..100) by linear interpolation between closest ranks; None if empty."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    xs = sorted(values)
    if not xs:
        return None
    h = (len(xs) - 1) * p / 100
    i = math.floor(h)
    if i + 1 >= len(xs):
        return xs[-1]
    return xs[i] + (h - i) * (xs[i + 1] - xs[i])


def _mean(xs: list[float]) -> float | None:
    return math.fsum(xs) / len(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    if not xs:
        return None
    m = math.fsum(xs) / len(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / len(xs))


def distribution(values_ms: list[float], name: str, percentiles: tuple[float, ...] = (99,)) -> dict:
    """mean_, median_, std_, max_ and p<P>_ of `values_ms` under keys like mean_ttft_ms."""
    out = {f"mean_{name}_ms": _mean(values_ms), f"median_{name}_ms": percentile(values_ms, 50),
           f"std_{name}_ms": _std(values_ms), f"max_{name}_ms": max(values_ms) if values_ms else None}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = percentile(values_ms, p)
    return out


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft_ms=500,tpot_ms=50' -> {'ttft_ms': 500.0, 'tpot_ms': 50.0}; keys: ttft_ms, tpot_ms, e2el_ms."""
    slo: dict[str, float] = {}
    for part in (text or "").replace(" ", ",").split(","):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO term {part!r}; write KEY=MILLISECONDS with KEY one of {list(SLO_KEYS)}, "
                             "e.g. --slo ttft_ms=500,tpot_ms=50")
        try:
            bound = float(value)
        except ValueError:
            raise ValueError(f"SLO bound {part!r} is not a number of milliseconds") from None
        if not bound > 0:
            raise ValueError(f"SLO bound {part!r} must be > 0")
        slo[key] = bound
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """Whether a successful request meets every bound (a missing TPOT meets any TPOT bound)."""
    if not record.success:
        return False
    measured = {"ttft_ms": record.ttft, "tpot_ms": record.tpot, "e2el_ms": record.e2el}
    for key, bound in slo.items():
        value = measured[key]
        if value is None:
            if key == "tpot_ms":
                continue
            return False
        if value * 1000 > bound:
            return False
    return True


def compute_metrics(records: list[RequestRecord], duration_s: float, slo: dict[str, float] | None = None,
                    percentiles: tuple[float, ...] = (99,)) -> dict:
    """The benchmark's figures (see the module docstring) as a flat dict; latencies in milliseconds."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    ok = [r for r in records if r.success]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    out: dict = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration_s,
    }
    if slo:
        good = sum(meets_slo(r, slo) for r in ok)
        out.update(slo=dict(slo), good_requests=good, request_goodput=good / duration_s)
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    tpots = [r.tpot * 1000 for r in ok if r.tpot is not None]
    itls = [gap * 1000 for r in ok for gap in r.itls]
    e2els = [r.e2el * 1000 for r in ok if r.e2el is not None]
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        out.update(distribution(values, name, percentiles))
    out["num_itl_samples"] = len(itls)
    return out
