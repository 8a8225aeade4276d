"""Token-budget scheduler (Sarathi-Serve stall-free batching / DeepSpeed-FastGen Dynamic SplitFuse).

Each step has one budget of `max_num_batched_tokens`. Running requests that need one token
(decodes) are served first, then running requests part-way through their prompt continue, then
waiting requests are admitted with their prompts chunked so the budget is filled exactly. The
admission order is (priority, client's attained service, arrival): among equal priorities the
client the engine has served fewest tokens goes first (core/fair_share.py), so one client's
backlog never holds another's requests back; with one client it is plain (priority, arrival), or
with `prefix_aware_admission` those sharing a computed prefix with running requests first, within
bounds (core/prefix_admission.py).
With `max_num_seqs_per_client` set, a client already running that many sequences admits no more
while another client has requests waiting or running (or had, within the last second). With `max_decode_slowdown` set, a
PromptChunkLimiter (core/step_cost.py) also caps the prompt tokens of a step that has decodes,
from measured step costs, so a prompt chunk cannot stall the decodes beyond that factor.
Speculative tokens proposed for a decoding request (Request.spec_token_ids) are extra tokens of
its row, scheduled last, only from the budget and KV blocks left over after decodes, prompt
chunks and admissions: speculation never delays or preempts anyone. A request whose structured-output grammar is still compiling waits unscheduled
(Request.grammar.ready); a sampling row with a grammar carries its token bitmask. When the KV
pool runs dry, the newest running request is preempted by recompute (its blocks freed, its
tokens computed again later). The result is one immutable SchedulerOutput
(core/scheduler_output.py) of plain data, the model runner's only input; the scheduler keeps its
Requests by seq_id so the engine can map each row back to its Request.
"""

from __future__ import annotations

import bisect

from fuselm.core.fair_share import FairShare
from fuselm.core.kv_cache import KVCacheManager
from fuselm.core.kv_eviction import (evict_streaming, finish_compaction, h2o_step, is_h2o, snapkv_chunk,
                                     snapkv_step, streaming_cache_positions, streaming_window)
from fuselm.core.prefix_admission import PrefixAdmission
from fuselm.core.prefix_in_flight import blocks_in_flight, waits_for_prefix
from fuselm.core.request import Request, RequestStatus
from fuselm.core.scheduler_output import ScheduledRequest, SchedulerOutput
from fuselm.core.step_cost import PromptChunkLimiter


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 prompt_limiter: PromptChunkLimiter | None = None, max_num_seqs_per_client: int | None = None,
                 prefix_admission: PrefixAdmission | None = None) -> None:
        self.kv = kv
        self.prompt_limiter = prompt_limiter  # caps prompt tokens in steps with decodes (max_decode_slowdown)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_num_seqs_per_client = max_num_seqs_per_client  # None: no cap
        self.fair = FairShare()
        self.prefix_admission = prefix_admission  # admits requests sharing running ones' prefix first; None: off
        self.waiting: list[Request] = []  # sorted by (priority, arrival)
        self.running: list[Request] = []  # sorted by (priority, arrival)
        self.num_preemptions = 0
        self._unfinished: dict[int, Request] = {}  # seq_id -> every waiting or running request
        self._finished_seq_ids: list[int] = []  # finished since the last output that had rows

    def add_request(self, request: Request) -> None:
        self.fair.arrive(request.client_id)
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=Request.sort_key)
        self._unfinished[request.seq_id] = request

    def requests_of(self, output: SchedulerOutput) -> list[Request]:
        """The Request behind each of `output`'s rows, in row order (call before any of them finishes)."""
        return [self._unfinished[row.seq_id] for row in output.scheduled]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish_request(self, request: Request, reason: str) -> None:
        """Finish (stop, length, abort, error): remove it wherever it is and return its blocks."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        self.fair.leave(request.client_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._unfinished[request.seq_id]
        self._finished_seq_ids.append(request.seq_id)

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.kv_offset = 0
        victim.spec_token_ids = []
        victim.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(victim)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chosen: dict[int, tuple[Request, int]] = {}  # id(request) -> (request, num_new_tokens)
        preempted: list[str] = []

        def make_room(req: Request, n: int) -> bool:
            """Allocate n new slots for a running request, preempting newer ones if needed."""
            nonlocal budget
            while not self.kv.allocate_slots(req, n):
                victim = self.running[-1]
                if victim is req:
                    return False
                if id(victim) in chosen:
                    budget += chosen.pop(id(victim))[1]
                self._preempt(victim)
                preempted.append(victim.request_id)
            return True

        for req in self.running:  # StreamingLLM requests give back the blocks their window has left
            evict_streaming(self.kv, req)
        # 1) decodes, 2) partial prefills: one pass each over the running list in priority order.
        # Prompt tokens (2 and 3) may also be capped so the decodes of this step are not stalled.
        prompt_budget = None
        for want_decode in (True, False):
            if not want_decode and self.prompt_limiter is not None:
                cap = self.prompt_limiter.cap(len(chosen))
                prompt_budget = None if cap is None else min(cap, budget)
            for req in list(self.running):
                if budget == 0 or prompt_budget == 0 or req.status is not RequestStatus.RUNNING or id(req) in chosen:
                    continue
                remaining = req.num_tokens - req.num_computed_tokens
                if (remaining == 1) != want_decode:
                    continue
                n = min(remaining, budget if want_decode or prompt_budget is None else prompt_budget)
                n = snapkv_chunk(req, remaining, n)
                if n == 0:
                    continue
                if not make_room(req, n):
                    self._preempt(req)
                    preempted.append(req.request_id)
                    continue
                chosen[id(req)] = (req, n)
                budget -= n
                if not want_decode and prompt_budget is not None:
                    prompt_budget -= n

        # 3) admit waiting requests while budget, sequence slots and blocks last, in fair order.
        for req, n in chosen.values():
            self.fair.charge(req.client_id, n)
        blocked = self._capped_clients()
        order = self.fair.order(self.waiting, blocked)
        if (self.prefix_admission is not None and self.fair.num_active_clients <= 1 and budget
                and len(self.running) < self.max_num_seqs):
            order = self.prefix_admission.order(order, self.running)
        in_flight: set[int] | None = None  # prompt blocks running requests are computing (core/prefix_in_flight.py)
        for req in order:
            if budget == 0 or prompt_budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            leader = req.group_leader
            if leader is not None and not leader.is_finished and leader.num_computed_tokens < leader.num_prompt_tokens:
                continue  # let the first sample compute the shared prompt
            if req.grammar is not None and not req.grammar.ready:
                continue  # its grammar is still compiling
            if in_flight is None:
                in_flight = blocks_in_flight(self.running) if self.kv.enable_prefix_caching else set()
            if waits_for_prefix(self.kv, req, in_flight):
                continue  # running requests are computing its next prompt blocks: take them from the cache later
            shared = self._shared_prefix(req)
            remaining = req.num_tokens - req.num_computed_tokens - len(shared) * self.kv.block_size
            n = snapkv_chunk(req, remaining, min(remaining, budget if prompt_budget is None else prompt_budget))
            if n == 0:
                continue
            if not self.kv.allocate_slots(req, n, shared):
                break
            self.waiting.remove(req)
            if req.metrics.first_scheduled_time is None:
                req.num_cached_tokens = len(shared) * self.kv.block_size
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=Request.sort_key)
            chosen[id(req)] = (req, n)
            in_flight.update(blocks_in_flight([req]))
            self.fair.charge(req.client_id, n)
            budget -= n
            if prompt_budget is not None:
                prompt_budget -= n
            if self._at_cap(req.client_id):
                blocked.add(req.client_id)

        # 4) speculative tokens of the decodes, from what is left (never preempting for them).
        num_spec: dict[int, int] = {}
        for key, (req, n) in chosen.items():
            if budget == 0:
                break
            if req.spec_token_ids and req.max_tokens and n == 1 and req.num_tokens - req.num_computed_tokens == 1 \
                    and not is_h2o(req):  # H2O scores every computed query: it verifies no guesses
                s = min(len(req.spec_token_ids), budget)
                if self.kv.allocate_slots(req, 1 + s):
                    num_spec[key] = s
                    budget -= s
                    self.fair.charge(req.client_id, s)

        rows = [_row(req, n, num_spec.get(key, 0), self.kv.block_size) for key, (req, n) in chosen.items()]
        rows.sort(key=lambda r: r.num_new_tokens != 1)  # stable: single-token rows first
        finished: tuple[int, ...] = ()
        if rows:  # a step that runs carries them to the runner; an empty one keeps them for the next
            finished = tuple(self._finished_seq_ids)
            self._finished_seq_ids.clear()
        return SchedulerOutput(
            scheduled=tuple(rows), num_batched_tokens=self.max_num_batched_tokens - budget,
            preempted_ids=tuple(preempted), finished_seq_ids=finished,
        )

    def _capped_clients(self) -> set[str]:
        """Clients at max_num_seqs_per_client while another client is present (they admit no more)."""
        if self.max_num_seqs_per_client is None:
            return set()
        return {client for client in {r.client_id for r in self.running} if self._at_cap(client)}

    def _at_cap(self, client: str) -> bool:
        if self.max_num_seqs_per_client is None:
            return False
        running = sum(r.client_id == client for r in self.running)
        return running >= self.max_num_seqs_per_client and self.fair.others_present(client)

    def _shared_prefix(self, req: Request) -> list[int]:
        """Blocks this request can reuse: its n>1 group leader's prompt blocks, else the prefix cache."""
        if req.num_computed_tokens:
            return []
        leader = req.group_leader
        if leader is not None and leader.status is RequestStatus.RUNNING and req.kv_compression is None:
            usable = min(leader.num_computed_tokens, req.num_prompt_tokens - 1) // self.kv.block_size
            shared = self.kv.leader_prefix(leader, usable) if usable else []
            if shared:
                return shared
        return self.kv.find_cached_prefix(req)

    def update_from_output(self, output: SchedulerOutput) -> None:
        """Account the computed tokens of a finished step (before new tokens are appended).

        Speculative tokens do not count yet: `accept_speculative` adds the accepted ones.
        """
        for row in output.scheduled:
            req = self._unfinished.get(row.seq_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue
            req.num_computed_tokens = row.num_computed_tokens + row.num_new_tokens - row.num_spec_tokens
            if row.snapkv is not None:  # the runner compacted its cache to the budget
                finish_compaction(self.kv, req, row.snapkv[0])
            elif row.h2o is not None and row.h2o[2]:  # the runner compacted its cache to budget + recent
                finish_compaction(self.kv, req, row.h2o[2])
            self.kv.cache_full_blocks(req)

    def accept_speculative(self, req: Request, num_accepted: int) -> None:
        """After the accepted speculative tokens were appended: count their K/V as computed and
        roll back the rejected ones' slots (blocks past the computed tokens go back to the pool)."""
        if req.is_finished or req.status is not RequestStatus.RUNNING:
            return
        req.num_computed_tokens += num_accepted
        self.kv.trim(req)
        self.kv.cache_full_blocks(req)


def _row(req: Request, n: int, num_spec: int, block_size: int) -> ScheduledRequest:
    """The plain-data row for `req` computing its next n tokens plus num_spec speculative ones.

    Token histories are copied only for the rows whose sampling reads them: the prompt for a
    repetition penalty or for prompt logprobs still to be scored, the output so far for penalties
    and min_tokens. Other rows (the common case) carry no list longer than this step's tokens.
    """
    start = req.num_computed_tokens
    tokens = req.all_token_ids[start:start + n]
    if num_spec:
        tokens = tokens + req.spec_token_ids[:num_spec]
    needs_sample = start + n == req.num_tokens and req.max_tokens > 0  # max_tokens 0: the prompt only
    params = req.params
    prompt_ids = output_ids = draft_probs = None
    if (needs_sample and params.repetition_penalty != 1.0) or \
            (params.prompt_logprobs is not None and start < req.num_prompt_tokens - 1):
        prompt_ids = tuple(req.prompt_token_ids)
    if needs_sample and params.reads_output_tokens:
        output_ids = tuple(req.output_token_ids)
    if num_spec and req.spec_draft_probs is not None:
        draft_probs = req.spec_draft_probs[:num_spec]  # [num_spec, V]
    bitmask = None
    if needs_sample and req.grammar is not None:
        bitmask = req.grammar.token_bitmask(req.spec_token_ids[:num_spec])  # [num_spec + 1, ceil(V / 32)]
    return ScheduledRequest(
        seq_id=req.seq_id, request_id=req.request_id, num_computed_tokens=start, token_ids=tuple(tokens),
        block_ids=tuple(req.block_ids), needs_sample=needs_sample, params=params,
        num_prompt_tokens=req.num_prompt_tokens, sample_index=req.sample_index, num_spec_tokens=num_spec,
        group_block_ids=tuple(map(tuple, req.group_block_ids)),
        kv_offset=req.kv_offset, snapkv=snapkv_step(req, start, n), kv_window=streaming_window(req),
        h2o=h2o_step(req, start, n, block_size), cache_positions=streaming_cache_positions(req),
        prompt_token_ids=prompt_ids, output_token_ids=output_ids, draft_probs=draft_probs, grammar_bitmask=bitmask,
    )
