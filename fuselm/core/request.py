"""Request: one sequence's state inside the engine.

There are no prefill/decode phases: a request has `all_token_ids` (prompt + output so far) and
`num_computed_tokens` (how many of them have K/V in the cache). Each step the scheduler gives it
some of the remaining tokens to compute; when it has computed all of them, the last one's logits
are sampled. Chunked prefill, prefix-cache hits and preemption are all just changes to
`num_computed_tokens`.

A request with n > 1 is n Requests sharing a request_id; `seq_id` tells them (and every other
sequence in the process) apart. The scheduler's output names rows by it.
"""

from __future__ import annotations

import enum
import itertools
import time

import torch

from fuselm.outputs import PositionLogprobs, RequestMetrics
from fuselm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


class Request:
    __slots__ = (
        "seq_id", "request_id", "prompt", "prompt_token_ids", "output_token_ids", "all_token_ids", "params",
        "num_computed_tokens", "block_ids", "block_hashes", "status", "finish_reason", "stop_reason",
        "priority", "arrival_seq", "metrics", "output_text", "decode_stream", "stop_scan",
        "logprobs", "prompt_logprobs", "group_leader", "sample_index", "num_cached_tokens", "max_tokens",
        "num_registered_blocks", "spec_token_ids", "spec_draft_probs", "grammar",
        "client_id", "group_block_ids", "kv_compression", "kv_offset",
    )

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, *, arrival_seq: int, priority: int = 0, sample_index: int = 0,
                 group_leader: "Request | None" = None, arrival_time: float | None = None,
                 client_id: str = "") -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens  # resolved: params.max_tokens or what max_model_len leaves
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        # block tables of KV cache groups 1.. (core/kv_groups.py); empty for a model with one group
        self.group_block_ids: list[list[int]] = []
        self.block_hashes: list[int] = []  # hashes of this request's full blocks, in order
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.priority = priority  # lower value = served first (vLLM's convention)
        self.client_id = client_id  # who sent it: the scheduler shares admissions fairly between clients
        self.arrival_seq = arrival_seq
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        self.output_text = ""
        self.decode_stream = None
        self.stop_scan = None  # where the stop-string automaton stands in output_text (engine.detokenizer)
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.group_leader = group_leader  # for n > 1: the sample whose prompt KV the others share
        self.sample_index = sample_index
        self.num_cached_tokens = 0
        # Speculative decoding: tokens proposed for the next step (verified there, then cleared),
        # and, for a draft model with temperature > 0, the draft's distribution q of each [k, V].
        self.spec_token_ids: list[int] = []
        self.spec_draft_probs: torch.Tensor | None = None
        # Structured output: this sequence's grammar matcher (engine/structured_output.py's
        # SequenceGrammar), advanced with every appended token; None for unconstrained requests.
        self.grammar = None
        # KV compression (fuselm/kv_compression.py, core/kv_eviction.py): the settings, and how many
        # positions were evicted (a position p's K/V sit at cache index p - kv_offset of block_ids)
        self.kv_compression = None
        self.kv_offset = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival_seq)
