"""The adaptive speculation rule (fuselm/spec/adaptive.py) and the ngram proposer, on known inputs."""

from __future__ import annotations

import pytest

from fuselm.core.request import Request
from fuselm.core.step_cost import StepCostModel
from fuselm.sampling_params import SamplingParams
from fuselm.spec.adaptive import AcceptanceTracker, plan_speculation
from fuselm.spec.ngram import NgramProposer


def fitted(fixed: float, per_token: float, sizes=(1, 5, 9, 32, 64, 160)) -> StepCostModel:
    model = StepCostModel()
    for _ in range(4):
        for t in sizes:
            model.observe(t, fixed + per_token * t)
    return model


def test_cost_model_recovers_a_line():
    a, b = fitted(0.07, 0.005).coefficients()
    assert a == pytest.approx(0.07, rel=0.02) and b == pytest.approx(0.005, rel=0.02)


def test_cost_model_prior_when_sizes_do_not_vary():
    model = StepCostModel()
    for _ in range(10):
        model.observe(1, 0.08)
    a, b = model.coefficients()
    assert b > 0 and a + b == pytest.approx(0.08, rel=1e-6)  # fits the data, slope from the prior


def geometric(a: float, k: int) -> list[float]:
    return [a ** j for j in range(1, k + 1)]


def test_plan_batch_one_speculates_fully():
    cost = fitted(0.07, 0.005)  # a decode step is mostly fixed cost
    assert plan_speculation([geometric(0.7, 4)], 1, cost) == [4]
    assert plan_speculation([geometric(0.3, 4)], 1, cost)[0] >= 1
    assert plan_speculation([geometric(0.7, 2)], 1, cost) == [2]  # never more than the proposal


def test_plan_large_batch_is_selective():
    cost = fitted(0.07, 0.005)  # 32 rows: 230 ms, each extra token 5 ms against ~7 ms per emitted token
    assert plan_speculation([geometric(0.4, 4)] * 32, 32, cost) == [0] * 32
    plan = plan_speculation([geometric(0.95, 4)] + [geometric(0.4, 4)] * 31, 32, cost)
    assert plan[0] >= 1 and plan[1:] == [0] * 31  # only the request whose guesses are likely


def test_plan_charges_draft_rounds():
    cost = fitted(0.07, 0.0005)
    free = plan_speculation([geometric(0.6, 4)] * 4, 4, cost, None)
    assert free == [4] * 4
    assert plan_speculation([geometric(0.6, 4)] * 4, 4, cost, 0.2) == [0] * 4  # a round dearer than a target step


def test_plan_charges_one_off_setup():
    """A draft that must first compute a new request's prompt: the setup is paid only when the
    request's expected savings cover it, and a request needing none may speculate alone."""
    cost = fitted(0.1, 0.002)
    g = geometric(0.9, 4)
    assert plan_speculation([g] * 2, 2, cost, 0.01) == [4, 4]
    assert plan_speculation([g] * 2, 2, cost, 0.01, [0.001, 0.001]) == [4, 4]
    assert plan_speculation([g] * 2, 2, cost, 0.01, [5.0, 5.0]) == [0, 0]
    assert plan_speculation([g] * 2, 2, cost, 0.01, [0.0, 5.0]) == [4, 0]


def test_acceptance_tracker_follows_a_request():
    tracker = AcceptanceTracker()
    req = Request("r", None, [1, 2, 3], SamplingParams(), 16, arrival_seq=0)
    for _ in range(20):
        tracker.record(req, 4, 0)  # always rejected at the first position
    assert tracker.rate(req) < 0.1
    other = Request("s", None, [1], SamplingParams(), 16, arrival_seq=1)
    assert tracker.rate(other) == tracker.global_rate < 0.5


def test_acceptance_tracker_learns_runs():
    """Guesses that are right in runs: once the first is accepted, the rest mostly are too."""
    tracker = AcceptanceTracker()
    req = Request("r", None, [1, 2, 3], SamplingParams(), 16, arrival_seq=0)
    for i in range(200):
        tracker.record(req, 4, 4 if i % 2 else 0)  # half the rounds accept all four, half none
    g = tracker.gains(req, 4)
    assert g[0] == pytest.approx(0.5, abs=0.1)
    assert g[3] == pytest.approx(0.5, abs=0.12)  # not 0.5 ** 4: deeper positions follow the first


def test_ngram_proposes_latest_longest_match():
    proposer = NgramProposer(1, 3)
    req = Request("r", None, [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], SamplingParams(), 16, arrival_seq=0)
    # suffix (5, 2, 3) never occurred; (2, 3) last occurred at index 5 -> followed by 7, 8, 5
    assert proposer.propose(req, 3) == [7, 8, 5]
    req.append_token(7)  # suffix (2, 3, 7) occurred at index 5 -> followed by 8, 5, 2, 3
    assert proposer.propose(req, 10) == [8, 5, 2, 3, 7]
    req.append_token(42)  # nothing ends in 42 before
    assert proposer.propose(req, 3) == []


def test_realized_gate_switches_off_a_losing_bucket():
    from fuselm.spec.adaptive import RealizedGate

    gate = RealizedGate(baseline_every=32, retry_every=16, min_samples=3)  # explicit settings, not the defaults
    assert not gate.allow(32)  # no baseline yet: measure plain steps first
    for _ in range(3):
        gate.observe(32, False, 32, 0.2)  # 160 tok/s without speculation
    assert gate.allow(32)
    for _ in range(3):
        gate.observe(32, True, 50, 0.4)  # 125 tok/s with it: losing
    assert not gate.allow(32)
    for _ in range(16):
        gate.observe(32, False, 32, 0.2)
    assert gate.allow(32)  # a retry after 16 plain steps
    assert gate.allow(1) is False  # other buckets keep their own measurements
    for _ in range(3):
        gate.observe(1, False, 1, 0.08)
    for _ in range(3):
        gate.observe(1, True, 3, 0.1)  # winning at batch 1
    assert all(gate.allow(1) for _ in range(5))
    for _ in range(32):
        gate.observe(1, True, 3, 0.1)
    assert not gate.allow(1)  # 32 speculative steps in a row: time to refresh the baseline


def test_acceptance_tracker_unexplored_depths_borrow_from_shallower_ones():
    """Only two guesses verified per round, all accepted: depths 3-4 were never evaluated, and their
    estimate must follow what depths 1-2 showed (so the plan tries them), not a fixed 0.5 prior."""
    tracker = AcceptanceTracker()
    req = Request("r", None, [1, 2, 3], SamplingParams(), 16, arrival_seq=0)
    for _ in range(50):
        tracker.record(req, 2, 2)
    g = tracker.gains(req, 4)
    assert g[1] > 0.8 and g[3] > 0.6  # was 1 * 1 * 0.5 * 0.5 = 0.25 with the fixed prior
    cost = fitted(0.1, 0.002)
    assert plan_speculation([g], 1, cost, 0.02) == [4]  # batch 1, cheap draft: all four
    bad = AcceptanceTracker()
    for _ in range(50):
        bad.record(req, 2, 0)  # first guesses rejected: deeper ones are not assumed good
    assert bad.gains(req, 4)[3] < 0.05
