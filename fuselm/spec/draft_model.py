"""Draft-model proposer: a smaller model with the target's tokenizer guesses the next k tokens.

The draft has its own ModelRunner (weights + paged KV tensors) and its own block pool with prefix
caching. Each target request gets a shadow Request in the draft's pool holding the tokens the
draft has K/V for. A proposal round first rolls the shadow back to the longest prefix it shares
with the target's tokens (rejected guesses are dropped, their blocks returned), computes what it
lacks (the whole prompt the first time, then the one or two tokens the target added), and then
runs k batched single-token steps over every speculating request.

Greedy requests draft greedily. Sampled requests draw each guess from the draft's own distribution
q (the request's temperature, top-k/p, penalties applied to the draft's logits) and keep q for the
rejection sampler, which makes the emitted tokens follow the target's distribution exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from fuselm.config import EngineConfig
from fuselm.core.kv_cache import KVCacheManager
from fuselm.core.request import Request
from fuselm.core.scheduler_output import ScheduledRequest, SchedulerOutput
from fuselm.core.step_cost import PerTokenCost, StepCostModel
from fuselm.loader import load_model
from fuselm.runner.model_runner import ModelRunner
from fuselm.runner.sampler import Sampler, SamplingBatch, is_greedy

logger = logging.getLogger("fuselm")


class DraftModelProposer:
    def __init__(self, model: str, engine_config: EngineConfig, target_vocab_size: int, device: str,
                 dtype: torch.dtype, max_model_len: int, eos_token_ids: list[int]) -> None:
        loaded = load_model(model, dtype, keep_quantized=engine_config.quantization is None)
        if loaded.config.vocab_size != target_vocab_size:
            raise ValueError(f"draft model {model!r} has a vocabulary of {loaded.config.vocab_size} tokens, the target "
                             f"{target_vocab_size}; the draft must share the target's tokenizer")
        config = dataclasses.replace(engine_config, model=model, speculative_config=None)
        # one KV cache group: the shadow requests roll back, so no block may be released behind a window
        self.runner = ModelRunner(config, loaded.config, loaded.weights, device, dtype, max_model_len, eos_token_ids,
                                  group_kv_by_window=False)
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size, enable_prefix_caching=True)
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.cost = StepCostModel()  # seconds per decode-like draft round, by number of sequences
        self.last_catch_up_tokens = 0
        self.prompt_cost = PerTokenCost(decay=0.7)  # seconds per token of catch-up rounds (new prompts)
        self._shadows: dict[int, tuple[Request, Request]] = {}  # id(target request) -> (target, shadow)
        self._generators: dict[int, tuple[Request, torch.Generator]] = {}  # seq_id -> (target, draft's generator)
        logger.info("draft model %s: weights %.1f MiB, KV cache %d blocks", loaded.source,
                    self.runner.weight_bytes / 2**20, self.runner.num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    def _shadow(self, req: Request) -> Request:
        entry = self._shadows.get(id(req))
        if entry is None or entry[0] is not req:
            shadow = Request(req.request_id, None, req.prompt_token_ids, req.params, req.max_tokens, arrival_seq=0)
            self._shadows[id(req)] = (req, shadow)
            return shadow
        return entry[1]

    def pending_tokens(self, req: Request) -> int:
        """Tokens the draft would compute before its first guess for `req`: the one or two the target
        added since the last round, or for a request it has not seen the prompt past what its prefix
        cache holds (looked up by the target's block hashes: both pools hash tokens the same way)."""
        entry = self._shadows.get(id(req))
        if entry is not None and entry[0] is req:
            return max(1, req.num_tokens - entry[1].num_computed_tokens)
        bs = self.kv.block_size
        hits = 0
        for h in req.block_hashes[:(req.num_tokens - 1) // bs]:
            if self.kv.pool.lookup(h) is None:
                break
            hits += 1
        return req.num_tokens - hits * bs

    def _drop(self, req: Request) -> None:
        entry = self._shadows.pop(id(req), None)
        if entry is not None:
            self.kv.free(entry[1])

    def release_finished(self) -> None:
        for key in [key for key, (req, _) in self._shadows.items() if req.is_finished]:
            _, shadow = self._shadows.pop(key)
            self.kv.free(shadow)
        for seq_id in [seq_id for seq_id, (req, _) in self._generators.items() if req.is_finished]:
            del self._generators[seq_id]

    def _generator(self, req: Request) -> torch.Generator | None:
        """A seeded request's generator for the draft's guesses. The target runner verifies with one
        seeded seed + sample_index; this one starts from a different seed (odd multiplier, odd
        offset: never the same low 32 bits that torch seeds from), so guesses and their acceptance
        draws stay independent, as rejection sampling needs."""
        if req.params.seed is None:
            return None
        entry = self._generators.get(req.seq_id)
        if entry is None:
            seed = ((req.params.seed + req.sample_index) * 0x9E3779B1 + 0x7F4A7C15) % 2**64
            entry = self._generators[req.seq_id] = (req, torch.Generator().manual_seed(seed))
        return entry[1]

    def _sync(self, req: Request, k: int) -> Request | None:
        """Roll the shadow back to what it shares with the target, and give it slots for this round."""
        shadow = self._shadow(req)
        target = req.all_token_ids
        have = shadow.all_token_ids
        common = 0
        limit = min(shadow.num_computed_tokens, len(target) - 1)  # the last token is always fed: its logits are needed
        while common < limit and have[common] == target[common]:
            common += 1
        bs = self.kv.block_size
        if common % bs and common // bs < len(shadow.block_ids):
            if self.kv.pool.block_hash[shadow.block_ids[common // bs]] is not None:
                common -= common % bs  # never write into a block the prefix cache holds: recompute its tail
        shadow.num_computed_tokens = common
        shadow.all_token_ids = list(target)
        self.kv.trim(shadow)
        if len(shadow.block_hashes) > common // bs:  # hashes past the kept tokens are stale
            del shadow.block_hashes[common // bs:]
            shadow.num_registered_blocks = min(shadow.num_registered_blocks, len(shadow.block_hashes))
        shared = self.kv.find_cached_prefix(shadow) if common == 0 and not shadow.block_ids else []
        need = len(target) - common - len(shared) * bs
        if not self.kv.allocate_slots(shadow, need + k - 1, shared):
            self._drop(req)
            return None
        return shadow

    @torch.inference_mode()
    def propose(self, requests: list[Request], k: int) -> None:
        """Set spec_token_ids (k guesses) and, for sampled requests, spec_draft_probs ([k, V]) on each request."""
        self.release_finished()
        active = [(req, sh) for req in requests if (sh := self._sync(req, k)) is not None]
        # tokens the draft computes before its first guess (a new request's whole prompt: a one-off prefill)
        self.last_catch_up_tokens = sum(sh.num_tokens - sh.num_computed_tokens for _, sh in active)
        drafts: list[list[int]] = [[] for _ in active]
        probs: list[list[torch.Tensor]] = [[] for _ in active]
        for _ in range(k):
            if not active:
                break
            rows = tuple(ScheduledRequest(seq_id=sh.seq_id, request_id=sh.request_id,
                                          num_computed_tokens=sh.num_computed_tokens,
                                          token_ids=tuple(sh.all_token_ids[sh.num_computed_tokens:]),
                                          block_ids=tuple(sh.block_ids), needs_sample=True, params=sh.params,
                                          num_prompt_tokens=sh.num_prompt_tokens) for _, sh in active)
            t0 = time.perf_counter()
            logits = self.runner.last_token_logits(SchedulerOutput(rows, sum(r.num_new_tokens for r in rows), ()))
            tokens = self._choose(logits, active, drafts, probs)
            seconds = time.perf_counter() - t0
            if all(r.num_new_tokens <= 2 for r in rows):  # decode-like rounds (a first catch-up is a prefill)
                self.cost.observe(len(active), seconds)
            elif (computed := sum(r.num_new_tokens for r in rows)) >= 32:
                self.prompt_cost.observe(seconds, computed)
            for j, ((req, sh), token) in enumerate(zip(active, tokens)):
                sh.num_computed_tokens = sh.num_tokens
                self.kv.cache_full_blocks(sh)
                sh.all_token_ids.append(token)
                drafts[j].append(token)
        for (req, _), guess, q in zip(active, drafts, probs):
            req.spec_token_ids = guess
            req.spec_draft_probs = torch.stack(q) if q else None

    def _choose(self, logits: torch.Tensor, active, drafts, probs) -> list[int]:
        reqs = [req for req, _ in active]
        batch = SamplingBatch(params=[r.params for r in reqs], generators=[self._generator(r) for r in reqs],
                              prompt_token_ids=[r.prompt_token_ids for r in reqs],
                              output_token_ids=[r.output_token_ids + d for r, d in zip(reqs, drafts)],
                              eos_token_ids=self.eos_token_ids)
        sampled = [j for j, r in enumerate(reqs) if not is_greedy(r.params)]
        tokens = self.sampler(logits, batch).token_ids.tolist() if len(sampled) < len(reqs) else [0] * len(reqs)
        if sampled:
            sub = SamplingBatch(params=[batch.params[j] for j in sampled],
                                generators=[batch.generators[j] for j in sampled],
                                prompt_token_ids=[batch.prompt_token_ids[j] for j in sampled],
                                output_token_ids=[batch.output_token_ids[j] for j in sampled],
                                eos_token_ids=self.eos_token_ids)
            q = self.sampler.probabilities(logits[torch.tensor(sampled, device=logits.device)], sub)  # [S, V]
            for row, j in enumerate(sampled):
                gen = batch.generators[j]
                qj = q[row].to(gen.device) if gen is not None else q[row]
                tokens[j] = int(torch.multinomial(qj, 1, generator=gen))
                probs[j].append(q[row])
        return tokens
