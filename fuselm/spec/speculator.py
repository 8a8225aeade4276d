"""Speculator: the engine's side of speculative decoding, between its steps.

Before a step it asks the proposer for guesses for every decoding request (prompt lookup or a
draft model), lets the adaptive rule pick how many to use this step (spec/adaptive.py), and puts
them on each request (Request.spec_token_ids); the scheduler makes them extra tokens of the
request's row. After the step it counts what was proposed and accepted and feeds the step's
measured time to the cost model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fuselm.config import EngineConfig
from fuselm.core.request import Request, RequestStatus
from fuselm.core.step_cost import PerTokenCost, StepCostModel
from fuselm.spec.adaptive import AcceptanceTracker, RealizedGate, plan_speculation
from fuselm.spec.config import SpeculativeConfig
from fuselm.spec.ngram import NgramProposer


@dataclass
class SpecStats:
    num_drafts: int = 0  # verifications: rows that carried speculative tokens
    num_draft_tokens: int = 0  # speculative tokens scheduled and verified
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification, the bonus token included (vLLM's definition)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass(frozen=True, slots=True)
class SpeculationTarget:
    """What the speculator knows of the model it speculates for: plain values the engine settled at
    load, not the engine itself."""

    engine_config: EngineConfig  # a draft model loads with the target's options (dtype, kernels, KV budget)
    vocab_size: int
    device: str
    dtype: torch.dtype
    max_model_len: int  # after the engine fitted it to the model and the KV pool
    eos_token_ids: tuple[int, ...]
    weight_bytes: int  # the target's weights; a draft's first cost estimates scale by the ratio


class Speculator:
    def __init__(self, config: SpeculativeConfig, target: SpeculationTarget) -> None:
        self.config = config
        self.k_max = config.num_speculative_tokens
        self.max_model_len = target.max_model_len
        self.max_num_seqs = target.engine_config.max_num_seqs
        self.ngram = None
        self.draft = None
        if config.method == "ngram":
            self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        else:
            from fuselm.spec.draft_model import DraftModelProposer

            self.draft = DraftModelProposer(config.model, target.engine_config, target.vocab_size, target.device,
                                            target.dtype, target.max_model_len, list(target.eos_token_ids))
            # until the draft is measured its costs are the target's scaled by weight bytes (decode
            # streams the weights; a prompt token's arithmetic scales with them too)
            self._draft_ratio = self.draft.runner.weight_bytes / max(1, target.weight_bytes)
        self.cost = StepCostModel()
        # a draft model must be tried to be judged, and each try costs its rounds: start from the
        # rate a same-family draft usually reaches (0.8; Qwen2.5-Coder 0.5B for 1.5B measured 0.97
        # on code), which a few verifications correct. Prompt lookup proposes only where it found a
        # match, and its guesses cost no rounds: the neutral 0.5.
        self.acceptance = AcceptanceTracker(prior=0.8 if self.draft is not None else 0.5)
        self.gate = RealizedGate()
        self._step_accepted = 0  # speculative tokens accepted in the current step
        self.stats = SpecStats()
        self._draft_seconds = 0.0  # time the draft model took in this step's proposal (costed on its own)
        self.prompt_cost = PerTokenCost(decay=0.7)  # the target's seconds per token of steps with prompt chunks

    def _room(self, req: Request) -> int:
        """Most speculative tokens the request can take: one token is always the verified/bonus one."""
        return max(0, min(self.k_max, req.max_tokens - req.num_output_tokens - 1,
                          self.max_model_len - req.num_tokens - 1))

    def propose(self, running: list[Request], num_waiting: int) -> None:
        self._draft_seconds = 0.0
        self._step_accepted = 0
        for req in running:
            req.spec_token_ids = []
            req.spec_draft_probs = None
        decoding = [r for r in running if r.status is RequestStatus.RUNNING and r.num_tokens - r.num_computed_tokens == 1
                    and not r.is_finished]
        if self.ngram is not None:
            self.ngram.release_finished()
        self.acceptance.release_finished()
        if not decoding:
            return
        rooms = [self._room(r) for r in decoding]
        if self.ngram is not None:
            guesses = [self.ngram.propose(r, room) if room else [] for r, room in zip(decoding, rooms)]
            caps = [len(g) for g in guesses]
        else:
            caps = rooms
        plan = self._plan(decoding, caps, num_waiting, len(running))
        for r, k in zip(decoding, plan):
            if not k:
                self.acceptance.relax(r)
        if not any(plan):
            return
        if self.ngram is not None:
            for r, g, k in zip(decoding, guesses, plan):
                r.spec_token_ids = g[:k]
        else:
            chosen = [(r, k) for r, k in zip(decoding, plan) if k]
            t0 = time.perf_counter()
            self.draft.propose([r for r, _ in chosen], max(k for _, k in chosen))
            self._draft_seconds = time.perf_counter() - t0
            for r, k in chosen:
                r.spec_token_ids = r.spec_token_ids[:k]
                if r.spec_draft_probs is not None:
                    r.spec_draft_probs = r.spec_draft_probs[:k]

    def _plan(self, decoding: list[Request], caps: list[int], num_waiting: int, num_running: int) -> list[int]:
        if not any(caps):
            return [0] * len(decoding)
        if not self.config.adaptive:
            return caps
        if self.draft is not None and num_waiting and num_running < self.max_num_seqs:
            return [0] * len(decoding)  # admissions take the budget speculation gets last: don't run the draft for nothing
        gains = [self.acceptance.gains(r, c) for r, c in zip(decoding, caps)]
        draft_round = setup = None
        if self.draft is not None and self.cost.fitted:
            draft_round = (self.draft.cost.predict(len(decoding)) if self.draft.cost.fitted
                           else self.cost.predict(len(decoding)) * self._draft_ratio)
            setup = [self._setup_seconds(r, g) for r, g in zip(decoding, gains)]
        plan = plan_speculation(gains, len(decoding), self.cost, draft_round, setup)
        if any(plan) and not self.gate.allow(len(decoding)):
            return [0] * len(decoding)
        return plan

    SETUP_HORIZON = 128  # output tokens a request is expected to run on (max_tokens is often far off)

    def _setup_seconds(self, req: Request, gains: list[float]) -> float:
        """The draft's one-off cost to start proposing for `req` (computing a prompt it has not seen),
        spread over the speculative steps the request is expected to take. Without it a batch of new
        code prompts made the draft prefill 2,088 tokens (5 s) for a step that saved 0.1 s."""
        pending = self.draft.pending_tokens(req)
        if pending <= 2:
            return 0.0
        per_token = self.draft.prompt_cost.value
        if per_token is None:
            per_token = (self.prompt_cost.value or self.cost.coefficients()[1]) * self._draft_ratio
        remaining = min(req.max_tokens - req.num_output_tokens, self.SETUP_HORIZON)
        steps = max(1.0, remaining / (1.0 + sum(gains)))
        return pending * per_token / steps

    def observe_step(self, out, seconds: float) -> None:
        """Fit the cost model to whole decode steps (every row one token plus its proposals): prompt
        chunks cost less per token than query rows that each read a whole context, and decode steps
        are the ones the plan is about. A draft model's rounds are costed by their own model.
        Steps with prompt chunks give the seconds per prompt token, the cost model's prior slope
        until verifications of different sizes have been seen."""
        prompt = sum(r.num_new_tokens for r in out.scheduled if r.num_new_tokens > 1 + r.num_spec_tokens)
        if prompt >= 64:
            self.prompt_cost.observe(seconds - self._draft_seconds, out.num_batched_tokens)
            self.cost.prior_slope = self.prompt_cost.value
        if all(r.num_new_tokens == 1 + r.num_spec_tokens for r in out.scheduled):
            self.cost.observe(out.num_batched_tokens, seconds - self._draft_seconds)
            speculated = any(r.num_spec_tokens for r in out.scheduled)
            catch_up = self.draft.last_catch_up_tokens if self.draft is not None and self._draft_seconds else 0
            if catch_up <= 2 * len(out.scheduled):  # a draft prefilling new prompts is a one-off, not the steady rate
                self.gate.observe(len(out.scheduled), speculated, len(out.scheduled) + self._step_accepted, seconds)

    def record(self, req: Request, num_proposed: int, num_accepted: int) -> None:
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += num_proposed
        self.stats.num_accepted_tokens += num_accepted
        self._step_accepted += num_accepted
        self.acceptance.record(req, num_proposed, num_accepted)
        m = req.metrics
        m.spec_num_drafts += 1
        m.spec_num_draft_tokens += num_proposed
        m.spec_num_accepted_tokens += num_accepted
