"""LLMEngine: add requests, then step(): schedule -> execute -> update.

The engine validates and tokenises requests, owns the scheduler and the model runner, appends
sampled tokens, applies every stop rule, detokenises incrementally and builds RequestOutputs.
An unfinished output's text leaves out the tail that a stop string could still cut
(detokenizer.visible_text), so the text of successive outputs only ever grows and streaming
callers (the server, `fuselm chat`) print the difference as it comes.
A request with n > 1 becomes n sequences that share the prompt's KV blocks; its RequestOutput
carries all n completions.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from fuselm.config import EngineConfig, parse_dtype, resolve_device
from fuselm.engine.detokenizer import append_text, find_stop_string, flush_text, visible_text
from fuselm.core.kv_cache import KVCacheManager
from fuselm.core.kv_groups import GroupedKVCacheManager, sequence_capacity
from fuselm.core.prefix_admission import PrefixAdmission
from fuselm.core.request import Request
from fuselm.engine.scheduler import Scheduler, SchedulerOutput
from fuselm.engine.structured_output import StructuredOutputManager, prepare_token_constraints, trim_speculation
from fuselm.core.step_cost import PromptChunkLimiter
from fuselm.errors import InvalidRequestError, check_text
from fuselm.loader import load_model
from fuselm.loader.load import keeps_quantized_weights
from fuselm.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from fuselm.parallel.group import WorkerFailedError
from fuselm.runner.model_runner import ModelOutput, ModelRunner, summarize_memory
from fuselm.models.registry import SLIDING_WINDOW_ARCHITECTURES
from fuselm.runner.sampler import SampledToken
from fuselm.sampling_params import SamplingParams
from fuselm.spec.speculator import SpeculationTarget, Speculator

logger = logging.getLogger("fuselm")

DEFAULT_MAX_MODEL_LEN_CAP = 8192


@dataclass
class EngineStats:
    num_prompt_tokens: int = 0  # prompt tokens computed (prefix hits excluded)
    num_generation_tokens: int = 0
    num_steps: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        t0 = time.perf_counter()
        self.config = config
        self.device = resolve_device(config.device)
        quantized = config.dtype == "auto" and not self.device.startswith("cuda") and keeps_quantized_weights(
            config.model, config.quantization)
        self.dtype = parse_dtype(config.dtype, self.device, quantized_weights=quantized)
        torch.manual_seed(config.seed)
        shard = None
        if config.tensor_parallel_size > 1:  # this process is rank 0: it loads only its shard
            from fuselm.parallel.sharding import TensorShard

            shard = TensorShard.of(config, 0)
        loaded = load_model(config.model, self.dtype, config.tokenizer, keep_quantized=config.quantization is None,
                            shard=shard)
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.generation_defaults = loaded.generation_defaults
        self.model_name = loaded.source
        limit = mc.max_position_embeddings
        if mc.sliding_window and mc.architecture not in SLIDING_WINDOW_ARCHITECTURES:
            limit = min(limit, mc.sliding_window)  # attention here is full, so stay inside the window to stay exact
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds what this model supports ({limit})")
        max_model_len = config.max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN_CAP)
        eos = list(dict.fromkeys(mc.eos_token_ids + self.tokenizer.eos_token_ids))
        self.eos_token_ids = eos
        if shard is not None:  # the runner interface over N processes (fuselm/executor/executor.py)
            from fuselm.executor.executor import TensorParallelExecutor

            self.runner = TensorParallelExecutor(config, mc, loaded.weights, self.device, self.dtype, max_model_len,
                                                 eos)
        else:
            self.runner = ModelRunner(config, mc, loaded.weights, self.device, self.dtype, max_model_len, eos)
        del loaded
        pool_tokens = sequence_capacity(self.runner.kv_groups, self.runner.num_blocks, config.max_num_batched_tokens,
                                        config.block_size)
        if pool_tokens < max_model_len:
            logger.warning("KV cache holds %d tokens; lowering max_model_len from %d", pool_tokens, max_model_len)
            max_model_len = pool_tokens
        self.max_model_len = max_model_len
        if any(group.window for group in self.runner.kv_groups):  # blocks behind a sliding window are released
            self.kv = GroupedKVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                                            self.runner.kv_groups)
        else:
            self.kv = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        limiter = None
        if config.max_decode_slowdown is not None:
            limiter = PromptChunkLimiter(config.max_decode_slowdown)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs, limiter,
                                   config.max_num_seqs_per_client,
                                   PrefixAdmission(self.kv) if config.prefix_aware_admission else None)
        self.groups: dict[str, list[Request]] = {}
        self.structured = StructuredOutputManager(self.tokenizer, mc.vocab_size, eos)  # grammars, on first use
        self.stats = EngineStats()
        self._arrival = itertools.count()
        # Called on the engine thread with each executed SchedulerOutput, after the forward wrote its K/V and
        # before any request of it finishes (fuselm/disagg/prefill.py copies finished prompt blocks out here).
        self.step_hooks: list = []
        self.speculator = None
        if config.speculative_config is not None:
            target = SpeculationTarget(config, mc.vocab_size, self.device, self.dtype, max_model_len, tuple(eos),
                                       self.runner.weight_bytes)
            self.speculator = Speculator(config.speculative_config, target)
        self.load_seconds = time.perf_counter() - t0
        logger.info("loaded %s on %s/%s in %.2f s: %s", self.model_name, self.device,
                    str(self.dtype).removeprefix("torch."), self.load_seconds, summarize_memory(self.runner, max_model_len))

    # ---- requests ---------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        """Text, token ids, or vLLM's prompt dicts: {"prompt": text} / {"prompt_token_ids": ids}."""
        if isinstance(prompt, dict):
            keys = set(prompt) & {"prompt", "prompt_token_ids"}
            if len(keys) != 1:
                raise InvalidRequestError(f"a prompt dict needs exactly one of 'prompt' (text) or 'prompt_token_ids', "
                                          f"got keys {sorted(prompt)}", param="prompt")
            prompt = prompt[keys.pop()]
        if not isinstance(prompt, (str, list, tuple)):
            raise InvalidRequestError(f"prompt must be text or a list of token ids, got {type(prompt).__name__}",
                                      param="prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty; give at least one token of text", param="prompt")
            check_text(prompt, "prompt")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt token list is empty; give at least one token id", param="prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in the vocabulary [0, {vocab}), got {bad[:5]}",
                                      param="prompt")
        return None, ids

    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None, client_id: str = "") -> None:
        """Validate and queue a request (`client_id`: who sent it, for fair admission between clients).
        Raises InvalidRequestError (a ValueError naming the field) for bad input."""
        params = params or SamplingParams()
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        text, ids = self.tokenize_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}; "
                                      "shorten the prompt (it must leave room for at least one generated token)",
                                      param="prompt", code="context_length_exceeded")
        room = self.max_model_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                                      f"max_model_len ({self.max_model_len}); lower max_tokens to at most {room}",
                                      param="max_tokens", code="context_length_exceeded")
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        compression = self._kv_compression(params)
        prepare_token_constraints(params, self.tokenizer, self.model_config.vocab_size)
        grammars = None
        if params.structured_outputs is not None:  # parsed now (a bad spec raises), compiled in the background
            grammars = self.structured.new_sequences(params.structured_outputs, params.n)
        seq = next(self._arrival)
        arrival = arrival_time or time.time()
        group: list[Request] = []
        for i in range(params.n):
            group.append(Request(request_id, text, ids, params, max_tokens, arrival_seq=seq, priority=priority,
                                 sample_index=i, group_leader=group[0] if group else None, arrival_time=arrival,
                                 client_id=client_id))
            if grammars is not None:
                group[-1].grammar = grammars[i]
            group[-1].kv_compression = compression
        self.groups[request_id] = group
        for req in group:
            self.scheduler.add_request(req)

    def _kv_compression(self, params: SamplingParams):
        """The request's KV compression (its own, else the engine's default), None for none."""
        compression = params.kv_compression if params.kv_compression is not None else self.config.kv_compression
        if compression is None or compression.method == "none":
            return None
        if self.config.tensor_parallel_size > 1 or any(getattr(layer.self_attn, "sliding_window", None)
                                                       for layer in self.runner.model.layers):
            raise InvalidRequestError("kv_compression is not supported for models with sliding-window layers or with "
                                      "tensor parallelism; leave it unset", param="kv_compression")
        return compression

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for req in group:
            self.scheduler.finish_request(req, "abort")
        return self._make_output(group)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        spec = self.speculator
        t0 = time.perf_counter()
        failed = self._fail_grammar_errors()
        if spec is not None:
            try:
                spec.propose(self.scheduler.running, len(self.scheduler.waiting))
            except Exception:  # a proposer failure costs speed, never output: decode without guesses
                logger.exception("speculative proposal failed; decoding this step without it")
                for req in self.scheduler.running:
                    req.spec_token_ids = []
                    req.spec_draft_probs = None
            trim_speculation(self.scheduler.running)  # guesses a grammar rejects are not worth verifying
        out = self.scheduler.schedule()
        if out.is_empty:
            if not failed and self.structured.compiling:
                self.structured.wait(0.02)  # only compiling requests are left: wait for one, don't spin
            return failed
        requests = self.scheduler.requests_of(out)  # row i's Request: the runner sees only the plain rows
        now = time.time()
        for req in requests:
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        try:
            result = self.runner.execute(out)
        except WorkerFailedError:  # a tensor-parallel rank is gone: the engine cannot go on
            raise
        except Exception as exc:  # a failed step fails its requests, never the engine
            logger.exception("model step failed; failing the %d requests in it", len(out.scheduled))
            return failed + self._fail_step(out, f"internal error during the model step: {exc}")
        for hook in self.step_hooks:
            hook(out)
        outputs = failed + self._update(out, requests, result)
        if self.scheduler.prompt_limiter is not None:
            self._observe_step_cost(out, time.perf_counter() - t0)
        if spec is not None:  # the whole step: proposing, scheduling, the forward, verifying, appending
            spec.observe_step(out, time.perf_counter() - t0)
        return outputs

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a one-process engine holds nothing to stop)."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    def _observe_step_cost(self, out: SchedulerOutput, seconds: float) -> None:
        """Feed the prompt-chunk limiter: decoding rows, prompt tokens and the step's duration."""
        decodes = prompt = 0
        for row in out.scheduled:
            if row.num_spec_tokens:
                return  # verification steps cost more than their rows say; they would skew the fit
            if row.num_new_tokens == 1:
                decodes += 1
            else:
                prompt += row.num_new_tokens
        self.scheduler.prompt_limiter.observe(decodes, prompt, seconds)

    def _fail_grammar_errors(self) -> list[RequestOutput]:
        """Fail the requests whose structured-output grammar did not compile (whole n>1 groups)."""
        outputs = []
        for req in self.structured.failed_requests(self.scheduler.waiting):
            group = self.groups.pop(req.request_id, None)
            if group:
                for member in group:
                    self.scheduler.finish_request(member, "error")
                o = self._make_output(group)
                o.error = req.grammar.error
                outputs.append(o)
        return outputs

    def _fail_step(self, out: SchedulerOutput, message: str) -> list[RequestOutput]:
        """Fail the requests scheduled in the failed step (whole n>1 groups) and return their blocks."""
        outputs = []
        for rid in dict.fromkeys(row.request_id for row in out.scheduled):
            group = self.groups.pop(rid, None)
            if group:
                for req in group:
                    self.scheduler.finish_request(req, "error")
                o = self._make_output(group)
                o.error = message
                outputs.append(o)
        return outputs

    def _update(self, out: SchedulerOutput, requests: list[Request], result: ModelOutput) -> list[RequestOutput]:
        """Apply the runner's results to the Requests: `requests`, `out.scheduled` and `result` align by position."""
        self.scheduler.update_from_output(out)
        self.stats.num_steps += 1
        now = time.time()
        touched: dict[str, None] = {}
        for row, req, sampled, prompt_lp in zip(out.scheduled, requests, result.sampled, result.prompt_logprobs):
            if req.is_finished:
                continue
            if row.num_computed_tokens < req.num_prompt_tokens:
                self.stats.num_prompt_tokens += min(row.num_new_tokens, req.num_prompt_tokens - row.num_computed_tokens)
            if prompt_lp is not None:
                self._record_prompt_logprobs(req, prompt_lp)
            if sampled is None:
                if req.max_tokens == 0 and req.num_computed_tokens >= req.num_prompt_tokens:
                    self._finish_prompt_only(req, now)
                    touched[req.request_id] = None
                continue
            touched[req.request_id] = None
            for token in sampled:
                self._append(req, token, now)
                if req.is_finished:
                    break
            if row.num_spec_tokens:
                accepted = len(sampled) - 1
                self.speculator.record(req, row.num_spec_tokens, accepted)
                self.scheduler.accept_speculative(req, accepted)
        outputs = []
        for rid in touched:
            group = self.groups.get(rid)
            if group is None:
                continue
            output = self._make_output(group)
            if output.finished:
                del self.groups[rid]
            outputs.append(output)
        return outputs

    def _finish_prompt_only(self, req: Request, now: float) -> None:
        """A max_tokens 0 request is done once its prompt is computed: nothing sampled, its blocks freed."""
        req.metrics.finished_time = now
        self.scheduler.finish_request(req, "length")

    def _append(self, req: Request, sampled: SampledToken, now: float) -> None:
        token = sampled.token_id
        req.append_token(token)
        if req.grammar is not None and not req.grammar.accept(token):
            logger.warning("request %s: token %d is outside its grammar", req.request_id, token)
        self.stats.num_generation_tokens += 1
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if req.logprobs is not None:
            req.logprobs.append(self._position_logprobs(token, sampled.logprob, sampled.rank, sampled.top))
        params = req.params
        piece = append_text(self.tokenizer, req, token)
        reason = stop = None
        if req.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            elif params.stop_token_ids and token in params.stop_token_ids:
                reason, stop = "stop", token
            else:
                stop = find_stop_string(req, len(piece))
                if stop is not None:
                    reason = "stop"
        if reason is None and req.grammar is not None and req.grammar.is_terminated:
            reason = "stop"  # the grammar is complete and took its stop token (ignore_eos cannot go on)
        if reason is None and (req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if stop is None or isinstance(stop, int):
                flush_text(self.tokenizer, req)
            req.stop_reason = stop
            m.finished_time = now
            self.scheduler.finish_request(req, reason)

    def _position_logprobs(self, token: int, logprob: float, rank: int, top: list[tuple[int, float]]) -> PositionLogprobs:
        decode = self.tokenizer.decode_token
        entry: PositionLogprobs = {token: Logprob(logprob, rank, decode(token))}
        for r, (tid, lp) in enumerate(top, start=1):
            if tid not in entry:
                entry[tid] = Logprob(lp, r, decode(tid))
        return entry

    def _record_prompt_logprobs(self, req: Request, chunk) -> None:
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]  # the first prompt token has no logprob
        for i, (tok, lp, rank, top) in enumerate(zip(chunk.token_ids, chunk.logprobs, chunk.ranks, chunk.top)):
            if chunk.start + i == len(req.prompt_logprobs):  # skip positions recomputed after preemption
                req.prompt_logprobs.append(self._position_logprobs(tok, lp, rank, top))

    def _make_output(self, group: list[Request]) -> RequestOutput:
        first = group[0]
        completions = [
            CompletionOutput(index=r.sample_index, text=visible_text(r), token_ids=list(r.output_token_ids),
                             finish_reason=r.finish_reason, stop_reason=r.stop_reason,
                             logprobs=list(r.logprobs) if r.logprobs is not None else None)
            for r in group
        ]
        finished = all(r.is_finished for r in group)
        if finished and first.metrics.finished_time is None:
            first.metrics.finished_time = time.time()
        return RequestOutput(
            request_id=first.request_id, prompt=first.prompt, prompt_token_ids=first.prompt_token_ids,
            outputs=completions, finished=finished, metrics=first.metrics, prompt_logprobs=first.prompt_logprobs,
            num_cached_tokens=first.num_cached_tokens,
        )
