"""Fair admission between clients (core/fair_share.py, engine/scheduler.py), without a model.

A simulated engine loop drives the real Scheduler: each step's rows are computed, every sampled
row gets a token, requests finish at their max_tokens. The properties are checked against the
waiting queue as it stood before each step, not against the scheduler's own bookkeeping: with one
client, the requests admitted in a step are the first ones of the waiting queue in (priority,
arrival) order (the order before per-client fairness); with a flooding client and light clients,
no light request waits behind more than one of the flooder's admissions; with a per-client cap,
a client never runs more than the cap while another client is present.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuselm.core.fair_share import FairShare
from fuselm.core.kv_cache import KVCacheManager
from fuselm.core.request import Request, RequestStatus
from fuselm.engine.scheduler import Scheduler
from fuselm.sampling_params import SamplingParams

_arrivals = iter(range(10**9))


def make_request(prompt_len: int, out_len: int, client: str = "", priority: int = 0) -> Request:
    prompt = list(range(5, 5 + prompt_len))
    return Request(f"r{prompt_len}-{out_len}", None, prompt, SamplingParams(max_tokens=out_len), out_len,
                   arrival_seq=next(_arrivals), priority=priority, client_id=client)


def run_step(sched: Scheduler) -> list[Request]:
    """One engine step; returns the requests admitted in it (waiting before, running or finished after)."""
    before = list(sched.waiting)
    out = sched.schedule()
    requests = sched.requests_of(out)
    sched.update_from_output(out)
    for row, req in zip(out.scheduled, requests):
        if row.needs_sample and not req.is_finished:
            req.append_token(7)
            if req.num_output_tokens >= req.max_tokens:
                sched.finish_request(req, "length")
    return [r for r in before if r.status is not RequestStatus.WAITING]


@st.composite
def single_client_workloads(draw):
    budget = draw(st.integers(1, 48))
    max_seqs = draw(st.integers(1, 6))
    reqs = [(draw(st.integers(1, 20)), draw(st.integers(1, 6)), draw(st.integers(0, 8)), draw(st.integers(-2, 2)))
            for _ in range(draw(st.integers(1, 14)))]
    return budget, max_seqs, reqs, draw(st.sampled_from(["", "someone"])), draw(st.sampled_from([None, 1, 2]))


def running_of(sched: Scheduler) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in sched.running:
        counts[r.client_id] = counts.get(r.client_id, 0) + 1
    return counts


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(single_client_workloads())
def test_one_client_is_admitted_in_priority_then_arrival_order(workload):
    budget, max_seqs, specs, client, cap = workload
    sched = Scheduler(KVCacheManager(256, 4, False), budget, max_seqs, max_num_seqs_per_client=cap)
    pending = sorted(specs, key=lambda s: s[2])
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][2] <= step:
            prompt_len, out_len, _, priority = pending.pop(0)
            sched.add_request(make_request(prompt_len, out_len, client, priority))
        queue = sorted(sched.waiting, key=lambda r: (r.priority, r.arrival_seq))
        admitted = run_step(sched)
        assert admitted == queue[:len(admitted)]  # a prefix of the (priority, arrival) order
        step += 1
        assert step < 2000


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 40), st.integers(1, 6), st.integers(8, 64), st.integers(0, 2**16))
def test_no_light_client_waits_behind_a_flooders_backlog(backlog, max_seqs, budget, seed):
    rng = random.Random(seed)
    sched = Scheduler(KVCacheManager(4096, 4, False), budget, max_seqs)
    for _ in range(backlog):
        sched.add_request(make_request(rng.randint(1, 30), rng.randint(1, 12), "flood"))
    lights = {rng.randrange(0, 3 * backlog): f"light{i}" for i in range(rng.randint(1, 5))}
    watched: dict[int, tuple[Request, int]] = {}  # seq_id -> (light request, flood admissions since it came)
    step = 0
    while sched.has_unfinished() or any(s >= step for s in lights):
        if step in lights:
            req = make_request(rng.randint(1, 30), rng.randint(1, 4), lights[step])
            sched.add_request(req)
            watched[req.seq_id] = (req, 0)
        admitted = run_step(sched)
        flood = sum(r.client_id == "flood" for r in admitted)
        for seq_id, (req, count) in list(watched.items()):
            if req in admitted:
                assert count <= 1, f"{req.client_id} waited behind {count} of the flood's admissions"
                del watched[seq_id]
            else:
                watched[seq_id] = (req, count + flood)
        step += 1
        assert step < 5000
    assert not watched


def test_a_newcomer_waits_for_one_free_seat_not_the_whole_backlog():
    """The scenario the fair order exists for: a newcomer reaches a seat at the next free one, not
    after the flood's whole backlog (which is what one shared identity still gets)."""
    for newcomer_client, expect_wait_behind_all in (("light", False), ("flood", True)):
        sched = Scheduler(KVCacheManager(4096, 4, False), 64, 2)
        for _ in range(10):
            sched.add_request(make_request(8, 4, "flood"))
        run_step(sched)
        newcomer = make_request(8, 2, newcomer_client)
        sched.add_request(newcomer)
        flood_before = 0  # the flood's admissions before the newcomer's, or in the same step
        while newcomer.status is RequestStatus.WAITING:
            flood_before += sum(r.client_id == "flood" for r in run_step(sched) if r is not newcomer)
        assert flood_before == 8 if expect_wait_behind_all else flood_before <= 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4), st.integers(2, 8), st.integers(2, 4), st.integers(0, 2**16))
def test_per_client_cap_while_others_are_present(cap, max_seqs, num_clients, seed):
    rng = random.Random(seed)
    sched = Scheduler(KVCacheManager(4096, 4, False), 256, max_seqs, max_num_seqs_per_client=cap)
    sched.fair.presence_seconds = 0.0  # present only while it has requests
    for _ in range(12):
        for c in range(num_clients):
            sched.add_request(make_request(rng.randint(1, 10), rng.randint(1, 6), f"c{c}"))
    steps = 0
    while sched.has_unfinished():
        others = sched.fair.num_active_clients > 1
        before = running_of(sched)
        waiting_before = len(sched.waiting)
        admitted = run_step(sched)
        for client, n in running_of(sched).items():
            if others:
                assert n <= max(cap, before.get(client, 0)), (client, n, before)
        if not others and waiting_before:  # alone: the cap does not apply, every free seat is taken
            assert len(admitted) == min(waiting_before, max_seqs - sum(before.values()))
        steps += 1
        assert steps < 2000, "the cap stalled the queue"


def test_the_cap_holds_while_another_client_was_here_moments_ago():
    for presence, expect_running in ((60.0, 2), (0.0, 6)):
        sched = Scheduler(KVCacheManager(4096, 4, False), 256, 6, max_num_seqs_per_client=2)
        sched.fair.presence_seconds = presence
        visitor = make_request(4, 1, "visitor")
        sched.add_request(visitor)
        run_step(sched)
        assert visitor.is_finished
        for _ in range(8):
            sched.add_request(make_request(4, 3, "steady"))
        run_step(sched)
        assert running_of(sched) == {"steady": expect_running}


def test_a_new_client_starts_level_and_idle_clients_are_forgotten():
    fair = FairShare()
    fair.arrive("a")
    fair.charge("a", 1000)
    fair.arrive("b")  # starts at a's counter: no credit for having been away
    assert fair.service["b"] == fair.service["a"] == 1000
    fair.charge("b", 10)
    fair.leave("a")
    fair.arrive("a")  # returns: lifted to the lowest active counter (b's), not left behind at 1000
    assert fair.service["a"] == 1010
    fair.leave("a")
    fair.leave("b")
    assert fair.service == {} and not fair.unfinished  # all idle: nothing carried over
