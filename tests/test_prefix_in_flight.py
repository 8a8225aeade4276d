"""Admission waits for a long prefix another request is computing (core/prefix_in_flight.py): the prefix
is computed once and later requests take all of it from the prefix cache; short shared parts, and requests
sharing nothing, are admitted at once."""

from __future__ import annotations

from fuselm.core.kv_cache import KVCacheManager
from fuselm.core.prefix_in_flight import MIN_WAIT_BLOCKS
from fuselm.core.request import Request, RequestStatus
from fuselm.engine.scheduler import Scheduler
from fuselm.sampling_params import SamplingParams

BS = 16


def make_requests(prefix_blocks: int, tails: list[int]) -> list[Request]:
    prefix = list(range(1000, 1000 + prefix_blocks * BS))
    return [Request(f"r{i}", None, prefix + [5000 + 100 * i + j for j in range(n)], SamplingParams(max_tokens=2), 2,
                    arrival_seq=i) for i, n in enumerate(tails)]


def run(requests: list[Request], budget: int) -> tuple[list[list[str]], int]:
    """(ids admitted at each step, prompt tokens computed in all) of a run to the end."""
    kv = KVCacheManager(512, BS, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_batched_tokens=budget, max_num_seqs=16)
    for r in requests:
        sched.add_request(r)
    admitted, computed = [], 0
    while sched.has_unfinished():
        waiting = list(sched.waiting)
        out = sched.schedule()
        rows = sched.requests_of(out)
        computed += sum(row.num_new_tokens for row, r in zip(out.scheduled, rows)
                        if row.num_computed_tokens < r.num_prompt_tokens)
        sched.update_from_output(out)
        for row, r in zip(out.scheduled, rows):
            if row.needs_sample:
                r.append_token(7)
                if len(r.output_token_ids) >= 2:
                    sched.finish_request(r, "length")
        admitted.append([r.request_id for r in waiting if r.status is not RequestStatus.WAITING])
        assert len(admitted) < 100
    assert kv.num_free_blocks == 512
    return admitted, computed


def test_a_long_prefix_is_computed_once():
    requests = make_requests(20, [7, 9, 11])
    admitted, computed = run(requests, budget=200)
    # r0's prompt (327 tokens) takes 2 steps; in the second, 73 tokens of budget are left, but r1 and r2 would
    # compute r0's last 8 prefix blocks again: they wait for them, then hit all 20 blocks
    assert admitted[0] == ["r0"] and admitted[1] == []
    assert admitted[2] == ["r1", "r2"]
    assert computed == 20 * BS + 7 + 9 + 11
    assert [r.num_cached_tokens for r in requests] == [0, 20 * BS, 20 * BS]


def test_requests_arriving_together_under_a_large_budget():
    requests = make_requests(20, [7, 9, 11, 13])
    admitted, computed = run(requests, budget=4096)
    assert admitted[0] == ["r0"] and admitted[1] == ["r1", "r2", "r3"]
    assert computed == 20 * BS + 7 + 9 + 11 + 13


def test_short_shares_and_strangers_are_not_held_back():
    short = make_requests(MIN_WAIT_BLOCKS - 1, [40, 40])
    admitted, computed = run(short, budget=4096)
    assert admitted[0] == ["r0", "r1"]  # computing 7 shared blocks again costs less than a step's wait
    assert computed == 2 * ((MIN_WAIT_BLOCKS - 1) * BS + 40)
    long = make_requests(20, [7, 9])
    stranger = Request("s", None, list(range(9000, 9100)), SamplingParams(max_tokens=2), 2, arrival_seq=5)
    admitted, _ = run(long + [stranger], budget=400)
    assert admitted[0] == ["r0", "s"]  # the stranger is admitted while r1 waits for r0's prefix
