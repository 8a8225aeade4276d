"""Capacity under an SLO, as arithmetic: the rate search and the SLO derivation, with no I/O.

Capacity is the highest Poisson request rate at which at least a target share (90%) of requests
meet the SLO; it is what Sarathi-Serve and DistServe report, and unlike goodput at one rate it
compares servers without choosing the rate for them. Finding it takes one load test per probed
rate, each minutes long on a small machine, so the search must spend few probes: it brackets the
capacity by stepping the rate by a constant factor from a start guess until one probe passes and
one fails, then bisects the bracket in log space (rates span orders of magnitude across machines)
until the upper end is within a relative tolerance of the lower.

Kept apart from the HTTP client (fuselm/bench/capacity.py) so the search can be tested against a
synthetic attainment function whose threshold is known, and the SLO arithmetic by hand.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable


@dataclass
class Probe:
    """One measured rate: the share of its requests that met the SLO, and whether that reaches the target."""

    rate: float
    attainment: float
    passed: bool
    details: dict = field(default_factory=dict)  # what the measurement adds (metrics, seed, early stop)


@dataclass
class CapacitySearch:
    """The outcome: `capacity` is the highest passing rate below the lowest failing one (`upper`).
    Either is None when the search never found a rate of that kind within its limits."""

    capacity: float | None
    upper: float | None
    converged: bool
    probes: list[Probe]
    settings: dict

    def to_dict(self) -> dict:
        return {"capacity_rps": self.capacity, "upper_rps": self.upper, "converged": self.converged,
                "settings": self.settings, "probes": [asdict(p) for p in self.probes]}


def search_capacity(measure: Callable[[float], Probe | float | None], start_rate: float, target: float = 0.9,
                    step_factor: float = 1.5, tolerance: float = 0.1, max_probes: int = 8,
                    min_rate: float = 1e-3, max_rate: float = 1e4) -> CapacitySearch:
    """Bracket, then bisect, the highest rate whose attainment is >= target.

    `measure(rate)` runs one probe and returns its attainment (a float in [0, 1]) or a Probe, or
    None to end the search there (a time budget spent: the result keeps the bracket so far). From
    `start_rate` the rate is multiplied (while probes pass) or divided (while they fail) by
    `step_factor` until the outcome flips or a rate limit is reached; then the bracket [pass, fail]
    is halved at its geometric mean until fail / pass <= 1 + tolerance. At most `max_probes` probes
    run. A noisy probe that passes above a failing one cannot widen the bracket: each new rate lies
    strictly inside it.
    """
    if not start_rate > 0 or not math.isfinite(start_rate):
        raise ValueError(f"the start rate must be a positive finite number, got {start_rate}")
    if not 0 < target <= 1:
        raise ValueError(f"the attainment target must be in (0, 1], got {target}")
    if not step_factor > 1 or not tolerance > 0 or max_probes < 1 or not 0 < min_rate < max_rate:
        raise ValueError("need step_factor > 1, tolerance > 0, max_probes >= 1 and 0 < min_rate < max_rate")
    settings = {"start_rate": start_rate, "target": target, "step_factor": step_factor, "tolerance": tolerance,
                "max_probes": max_probes, "min_rate": min_rate, "max_rate": max_rate}
    probes: list[Probe] = []
    passing: float | None = None
    failing: float | None = None

    stopped = False

    def run(rate: float) -> bool | None:
        nonlocal stopped
        outcome = measure(rate)
        if outcome is None:
            stopped = True
            return None
        probe = outcome if isinstance(outcome, Probe) else Probe(rate, float(outcome), float(outcome) >= target)
        probes.append(probe)
        return probe.passed

    rate = min(max(start_rate, min_rate), max_rate)
    while len(probes) < max_probes:  # bracket
        passed = run(rate)
        if stopped:
            break
        if passed:
            passing = rate
            if failing is not None or rate >= max_rate:
                break
            rate = min(rate * step_factor, max_rate)
        else:
            failing = rate
            if passing is not None or rate <= min_rate:
                break
            rate = max(rate / step_factor, min_rate)
    while passing is not None and failing is not None and failing / passing > 1 + tolerance \
            and len(probes) < max_probes and not stopped:  # bisect
        mid = math.sqrt(passing * failing)
        passed = run(mid)
        if stopped:
            break
        if passed:
            passing = mid
        else:
            failing = mid
    converged = passing is not None and failing is not None and failing / passing <= 1 + tolerance
    return CapacitySearch(passing, failing, converged, probes, settings)


TPOT_FLOOR_MS = 1.0


def derive_slo(p90_prompt_ttft_ms: list[float], decode_tpot_ms: list[float], ttft_factor: float = 2.0,
               tpot_factor: float = 5.0, p90_prompt_len: int | None = None) -> dict:
    """The SLO from unloaded costs measured on one server: TTFT <= ttft_factor x the median unloaded
    TTFT of the workload's 90th-percentile prompt, TPOT <= tpot_factor x the median unloaded TPOT of
    a lone decoding request. Returns {"slo": {...}, "derivation": {...}} with every input."""
    if not p90_prompt_ttft_ms or not decode_tpot_ms:
        raise ValueError("deriving the SLO needs at least one unloaded TTFT and one unloaded TPOT measurement")
    if not ttft_factor > 0 or not tpot_factor > 0:
        raise ValueError("the SLO factors must be > 0")
    ttft = statistics.median(p90_prompt_ttft_ms)
    # a tiny model's tokens can reach the client in one chunk (measured TPOT 0): the bound is floored at
    # TPOT_FLOOR_MS rather than made impossible to meet
    tpot = max(statistics.median(decode_tpot_ms), TPOT_FLOOR_MS)
    slo = {"ttft_ms": ttft_factor * ttft, "tpot_ms": tpot_factor * tpot}
    derivation = {
        "rule": f"TTFT <= {ttft_factor:g} x unloaded TTFT of the workload's p90 prompt; "
                f"TPOT <= {tpot_factor:g} x unloaded TPOT of one decoding request",
        "p90_prompt_len": p90_prompt_len, "unloaded_p90_prompt_ttft_ms": ttft, "ttft_samples_ms": list(p90_prompt_ttft_ms),
        "unloaded_tpot_ms": tpot, "tpot_samples_ms": list(decode_tpot_ms),
        "ttft_factor": ttft_factor, "tpot_factor": tpot_factor, "tpot_floor_ms": TPOT_FLOOR_MS,
    }
    return {"slo": slo, "derivation": derivation}
