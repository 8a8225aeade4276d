"""Prefix-aware admission (core/prefix_admission.py): requests sharing a prefix that running requests
have computed are admitted first within their priority, nobody is passed over more than max_passes
times, and the engine's greedy output is the same with it on and off."""

from __future__ import annotations

import pytest

from conftest import random_prompts
from fuselm import LLM, SamplingParams
from fuselm.core.kv_cache import KVCacheManager
from fuselm.core.prefix_admission import PrefixAdmission
from fuselm.core.request import Request, RequestStatus
from fuselm.engine.scheduler import Scheduler
from fuselm.layers import cascade

BS = 16
_arrivals = iter(range(10**9))


def make_request(prompt: list[int], priority: int = 0) -> Request:
    return Request(f"r{len(prompt)}", None, prompt, SamplingParams(max_tokens=4), 4, arrival_seq=next(_arrivals),
                   priority=priority)


def families(count: int, prefix_len: int = 3 * BS) -> list[list[int]]:
    return [[1000 * (f + 1) + i for i in range(prefix_len)] for f in range(count)]


def step(sched: Scheduler) -> list[Request]:
    """One engine step (every row computed, a token for each sampled row); the requests it admitted."""
    before = list(sched.waiting)
    out = sched.schedule()
    requests = sched.requests_of(out)
    sched.update_from_output(out)
    for row, req in zip(out.scheduled, requests):
        if row.needs_sample and not req.is_finished:
            req.append_token(7)
    return [r for r in before if r.status is not RequestStatus.WAITING]


def shares_running_prefix(req: Request, running: list[Request]) -> bool:
    """The reference: the first prompt block's tokens equal those of a running request past its prompt."""
    return any(r.num_computed_tokens >= r.num_prompt_tokens and r.prompt_token_ids[:BS] == req.prompt_token_ids[:BS]
               for r in running)


def test_sharers_first_in_arrival_order_and_within_priority():
    kv = KVCacheManager(256, BS, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_batched_tokens=4096, max_num_seqs=4, prefix_admission=PrefixAdmission(kv))
    prefixes = families(3)
    first = make_request(prefixes[0] + [1, 2, 3])
    sched.add_request(first)
    assert step(sched) == [first]  # its prompt computed: its blocks are the running prefix
    waiting = [make_request(prefixes[i % 3] + [5, i]) for i in range(9)]  # families 0, 1, 2 interleaved
    urgent = make_request(prefixes[1] + [9], priority=-1)  # a better priority, sharing nothing running
    for r in waiting + [urgent]:
        sched.add_request(r)
    running = list(sched.running)
    queue = sorted(waiting + [urgent], key=Request.sort_key)
    expected = [urgent] + [r for r in queue[1:] if shares_running_prefix(r, running)]
    expected += [r for r in queue[1:] if r not in expected]
    assert step(sched) == expected[:3]  # max_num_seqs 4: three more slots
    assert expected[1].prompt_token_ids[:BS] == prefixes[0][:BS]


def test_nobody_is_passed_over_more_than_max_passes_times():
    kv = KVCacheManager(512, BS, enable_prefix_caching=True)
    max_passes = 3
    sched = Scheduler(kv, max_num_batched_tokens=4096, max_num_seqs=64,
                      prefix_admission=PrefixAdmission(kv, max_passes=max_passes))
    shared, other = families(2)
    sched.add_request(make_request(shared + [1]))
    step(sched)
    loner = make_request(other + [2])
    sched.add_request(loner)
    passes = 0
    for _ in range(4 * max_passes):  # a sharer arrives behind it every step and takes the one free slot
        sched.max_num_seqs = len(sched.running) + 1
        sched.add_request(make_request(shared + [3, passes]))
        admitted = step(sched)
        assert len(admitted) == 1
        if admitted[0] is loner:
            break
        passes += 1
    assert passes == max_passes


def test_nothing_running_keeps_the_queue_order():
    kv = KVCacheManager(64, BS, enable_prefix_caching=True)
    admission = PrefixAdmission(kv)
    queue = [make_request(p + [1]) for p in families(4)]
    assert admission.order(queue, []) == queue
    assert admission.passes == {}


@pytest.fixture
def group_small_shares(monkeypatch):
    monkeypatch.setattr(cascade, "MIN_GROUP_ROWS", 2)
    monkeypatch.setattr(cascade, "MIN_SHARED_BLOCKS", 2)
    monkeypatch.setattr(cascade, "MIN_GROUP_BLOCK_READS", 0)
    monkeypatch.setattr(cascade, "CHUNK_QUERY_ROWS_MIN_BLOCKS", 2)


def test_engine_output_is_the_same_with_it_on_and_off(tiny_llama, group_small_shares):
    """Interleaved prompt families, few sequence slots: the same greedy tokens either way, every block
    back in the pool, and shared-prefix attention saves at least as many reads with it on."""
    prefixes = random_prompts([3 * BS + 5] * 4, seed=11)
    tails = random_prompts([3 + i % 7 for i in range(24)], seed=12)
    prompts = [prefixes[i % 4] + tails[i] for i in range(24)]
    params = [SamplingParams(temperature=0, max_tokens=3 + (5 * i) % 11, ignore_eos=True) for i in range(24)]
    results = {}
    for on in (True, False):
        llm = LLM(tiny_llama[0], dtype="float32", device="cpu", max_num_seqs=8, prefix_aware_admission=on)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks
        results[on] = ([o.outputs[0].token_ids for o in outs], llm.engine.runner.cascade_kv_tokens_saved)
    assert results[True][0] == results[False][0]
    assert results[True][1] >= results[False][1]


def test_a_request_that_takes_no_prefix_hits_is_not_moved_ahead():
    """A request with prompt_logprobs computes its whole prompt (find_cached_prefix gives it nothing), so
    sharing running requests' prefix gains it nothing: it keeps its place behind an earlier request."""
    kv = KVCacheManager(256, BS, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_batched_tokens=4096, max_num_seqs=2, prefix_admission=PrefixAdmission(kv))
    shared, other = families(2)
    sched.add_request(make_request(shared + [1]))
    step(sched)
    earlier = make_request(other + [2])
    scoring = Request("scoring", None, shared + [3], SamplingParams(max_tokens=4, prompt_logprobs=1), 4,
                      arrival_seq=next(_arrivals))
    assert kv.find_cached_prefix(scoring) == []  # the reference: it would take no shared block
    sched.add_request(earlier)
    sched.add_request(scoring)
    assert step(sched) == [earlier]  # one free slot
