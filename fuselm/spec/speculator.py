"""Speculator: the engine's side of speculative decoding, between its steps.

Before a step it asks the proposer for guesses for every decoding request (prompt lookup or a
draft model), lets the adaptive rule pick how many to use this step (spec/adaptive.py), and puts
them on each request (Request.spec_token_ids); the scheduler makes them extra tokens of the
request's row. After the step it counts what was proposed and accepted and feeds the step's
measured time to the cost model.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuselm.engine.request import Request, RequestStatus
from fuselm.spec.adaptive import AcceptanceTracker, StepCostModel, choose_k
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


class Speculator:
    def __init__(self, config: SpeculativeConfig, engine) -> None:
        self.config = config
        self.k_max = config.num_speculative_tokens
        self.max_model_len = engine.max_model_len
        self.max_num_seqs = engine.config.max_num_seqs
        self.ngram = None
        self.draft = None
        if config.method == "ngram":
            self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        else:
            from fuselm.spec.draft_model import DraftModelProposer

            self.draft = DraftModelProposer(config.model, engine.config, engine.model_config.vocab_size,
                                            engine.device, engine.dtype, engine.max_model_len, engine.eos_token_ids)
        self.cost = StepCostModel()
        self.acceptance = AcceptanceTracker()
        self.stats = SpecStats()
        self.last_k = 0

    def _room(self, req: Request) -> int:
        """Most speculative tokens the request can take: one token is always the verified/bonus one."""
        return max(0, min(self.k_max, req.max_tokens - req.num_output_tokens - 1,
                          self.max_model_len - req.num_tokens - 1))

    def propose(self, running: list[Request], num_waiting: int) -> None:
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
        k = self._pick_k(decoding, caps, num_waiting, len(running))
        self.last_k = k
        chosen = [r for r, c in zip(decoding, caps) if k and c]
        for r, c in zip(decoding, caps):
            if not (k and c):
                self.acceptance.relax(r)
        if not chosen:
            return
        if self.ngram is not None:
            for r, g in zip(decoding, guesses):
                if k and g:
                    r.spec_token_ids = g[:k]
        else:
            self.draft.propose(chosen, k)
            for r, c in zip(decoding, caps):
                if r.spec_token_ids and len(r.spec_token_ids) > c:
                    r.spec_token_ids = r.spec_token_ids[:c]
                    if r.spec_draft_probs is not None:
                        r.spec_draft_probs = r.spec_draft_probs[:c]

    def _pick_k(self, decoding: list[Request], caps: list[int], num_waiting: int, num_running: int) -> int:
        if not any(caps):
            return 0
        if not self.config.adaptive:
            return self.k_max
        if self.draft is not None and num_waiting and num_running < self.max_num_seqs:
            return 0  # admissions will take the budget that speculation gets last: don't run the draft for nothing
        rates = [self.acceptance.rate(r) for r in decoding]
        return choose_k(rates, caps, self.k_max, len(decoding), self.cost,
                        self.draft.cost if self.draft is not None else None)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.cost.observe(num_tokens, seconds)

    def record(self, req: Request, num_proposed: int, num_accepted: int) -> None:
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += num_proposed
        self.stats.num_accepted_tokens += num_accepted
        self.acceptance.record(req, num_proposed, num_accepted)
        m = req.metrics
        m.spec_num_drafts += 1
        m.spec_num_draft_tokens += num_proposed
        m.spec_num_accepted_tokens += num_accepted
