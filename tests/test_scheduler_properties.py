"""Property tests (hypothesis) for the block pool and the scheduler, without a model.

A simulated engine loop drives the real Scheduler and KVCacheManager with random arrivals,
prompt sharing, aborts and finishes. After every step: the token budget and sequence limit hold,
every scheduled token has a slot, block reference counts equal the references requests hold, the
free list holds exactly the unreferenced blocks; at the end every request has finished and the
pool is full again. With a PromptChunkLimiter (fed a synthetic step cost), steps with decodes add no
more prompt tokens than its cap.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuselm.core.kv_cache import BlockPool, KVCacheManager
from fuselm.core.request import Request, RequestStatus
from fuselm.engine.scheduler import Scheduler
from fuselm.core.step_cost import PromptChunkLimiter
from fuselm.sampling_params import SamplingParams


def check_pool(kv: KVCacheManager, live: list[Request]) -> None:
    pool = kv.pool
    held = Counter(b for r in live for b in r.block_ids)
    for block_id in range(pool.num_blocks):
        assert pool.ref_cnt[block_id] == held.get(block_id, 0), f"block {block_id} ref count drifted"
        assert (block_id in pool.free_blocks) == (pool.ref_cnt[block_id] == 0)
    for h, block_id in pool.cached.items():
        assert pool.block_hash[block_id] == h


@st.composite
def workloads(draw):
    num_blocks = draw(st.integers(8, 40))
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    budget = draw(st.integers(1, 64))
    max_seqs = draw(st.integers(1, 8))
    caching = draw(st.booleans())
    n_req = draw(st.integers(1, 12))
    max_len = num_blocks * block_size  # a lone request always fits (the engine caps max_model_len so)
    reqs = []
    for _ in range(n_req):
        prompt_len = draw(st.integers(1, max(1, max_len // 2)))
        out_len = draw(st.integers(1, max(1, min(8, max_len - prompt_len))))
        reqs.append((prompt_len, out_len, draw(st.integers(0, 3)), draw(st.integers(0, 2)),
                     draw(st.booleans()), draw(st.integers(1, 2))))
    seed = draw(st.integers(0, 2**16))
    slowdown = draw(st.sampled_from([None, 1.5, 3.0]))
    return num_blocks, block_size, budget, max_seqs, caching, reqs, seed, slowdown


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_scheduler_never_leaks_and_always_finishes(workload):
    num_blocks, block_size, budget, max_seqs, caching, specs, seed, slowdown = workload
    rng = random.Random(seed)
    kv = KVCacheManager(num_blocks, block_size, caching)
    limiter = None if slowdown is None else PromptChunkLimiter(slowdown, min_chunk=block_size)
    sched = Scheduler(kv, budget, max_seqs, limiter)
    shared_prefix = [rng.randrange(100) for _ in range(64)]
    pending = []
    for i, (prompt_len, out_len, arrive_step, priority, share, n) in enumerate(specs):
        prompt = (shared_prefix[:prompt_len] if share else [rng.randrange(100) for _ in range(prompt_len)])
        pending.append((arrive_step, i, prompt, out_len, priority, n))
    live: list[Request] = []
    all_reqs: list[Request] = []
    step = 0
    while pending or sched.has_unfinished():
        for item in [p for p in pending if p[0] <= step]:
            pending.remove(item)
            _, i, prompt, out_len, priority, n = item
            group: list[Request] = []
            params = SamplingParams(max_tokens=out_len, n=n)
            for k in range(n):
                req = Request(str(i), None, prompt, params, out_len, arrival_seq=i, priority=priority,
                              sample_index=k, group_leader=group[0] if group else None)
                group.append(req)
                sched.add_request(req)
            live += group
            all_reqs += group
        running_decodes = sum(r.num_tokens - r.num_computed_tokens == 1 for r in sched.running)
        cap = None if limiter is None else limiter.cap(running_decodes)
        out = sched.schedule()
        decodes = sum(r.num_new_tokens == 1 for r in out.scheduled)
        prompt_tokens = sum(r.num_new_tokens for r in out.scheduled if r.num_new_tokens > 1)
        if cap is not None and decodes == running_decodes and not out.preempted_ids:
            assert prompt_tokens <= cap  # the limiter bounds the prompt tokens joining decodes
        if limiter is not None:  # a synthetic machine: 30 ms + 1 ms per decode row + 4 ms per prompt token
            limiter.observe(decodes, prompt_tokens, 0.03 + 0.001 * decodes + 0.004 * prompt_tokens)
        assert out.num_batched_tokens <= budget
        assert sum(r.num_new_tokens for r in out.scheduled) == out.num_batched_tokens
        assert len(sched.running) <= max_seqs
        for row in out.scheduled:
            assert row.num_new_tokens >= 1
            assert len(row.block_ids) * block_size >= row.num_computed_tokens + row.num_new_tokens
        check_pool(kv, [r for r in live if not r.is_finished])
        requests = sched.requests_of(out)
        assert [req.seq_id for req in requests] == [row.seq_id for row in out.scheduled]
        sched.update_from_output(out)
        for row, req in zip(out.scheduled, requests):
            if req.is_finished or not row.needs_sample:
                continue
            req.append_token(rng.randrange(100))
            if req.num_output_tokens >= req.max_tokens:
                sched.finish_request(req, "length")
        if rng.random() < 0.05:  # abort a random unfinished request
            candidates = [r for r in live if not r.is_finished]
            if candidates:
                sched.finish_request(rng.choice(candidates), "abort")
        live = [r for r in live if not r.is_finished]
        check_pool(kv, live)
        step += 1
        assert step < 5000, "scheduler stopped making progress"
    assert all(r.status is RequestStatus.FINISHED for r in all_reqs)
    assert kv.num_free_blocks == num_blocks


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "touch", "release", "register"]), st.integers(0, 5)),
                max_size=60))
def test_block_pool_reference_counts(ops):
    pool = BlockPool(6)
    held: list[int] = []  # one entry per reference we hold
    for op, arg in ops:
        if op == "alloc" and arg <= pool.num_free:
            held += pool.allocate(arg)
        elif op == "touch" and held:
            block = held[arg % len(held)]
            pool.touch([block])
            held.append(block)
        elif op == "release" and held:
            block = held.pop(arg % len(held))
            pool.release([block])
        elif op == "register" and held:
            pool.register(held[arg % len(held)], hash(("h", arg)))
        counts = Counter(held)
        assert all(pool.ref_cnt[b] == counts.get(b, 0) for b in range(6))
        assert pool.num_free == 6 - len(counts)
        for h, b in pool.cached.items():
            assert pool.block_hash[b] == h
    pool.release(held)
    assert pool.num_free == 6
