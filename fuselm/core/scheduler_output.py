"""What the scheduler decided for one step: the model runner's only input, as plain data.

It lives below the engine so that the runner (which executes it) and the draft-model proposer
(which builds its own for the draft's runner) read the same types without importing the engine.
Nothing here refers to the engine's live Request objects: a SchedulerOutput holds ints, tuples,
SamplingParams and at most two tensors per row (a draft model's probabilities, a grammar's token
bitmask), so it pickles and could be executed by a runner in another process. Rows name their
sequence by `seq_id`; the engine maps results back to its Requests by position, and the runner
keeps what must outlive a step (seeded generators) by seq_id until the sequence appears in
`finished_seq_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fuselm.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One sequence's share of a step and the facts about it that the runner's sampling reads."""

    seq_id: int  # unique per sequence: each of a request's n samples has its own
    request_id: str
    num_computed_tokens: int  # K/V already in the cache before this step
    token_ids: tuple[int, ...]  # the tokens to compute this step
    block_ids: tuple[int, ...]
    needs_sample: bool  # True when this step reaches the sequence's last token
    params: SamplingParams
    num_prompt_tokens: int
    sample_index: int = 0  # which of the request's n samples; a seeded generator starts at seed + sample_index
    num_spec_tokens: int = 0  # trailing token_ids that are speculative (proposed, to be verified)
    group_block_ids: tuple[tuple[int, ...], ...] = ()  # block tables of KV cache groups 1.. (core/kv_groups.py)
    kv_offset: int = 0  # positions evicted by KV compression: position p sits at cache index p - kv_offset
    snapkv: tuple[int, int, int] | None = None  # (budget, window, pool): compact the cache after this step
    kv_window: tuple[int, int] | None = None  # StreamingLLM (sink, window): what each query may see
    cache_positions: bool = False  # rotary position = cache index (p - kv_offset), not p (StreamingLLM "cache")
    h2o: tuple[int, int, int] | None = None  # H2O (budget, recent, keep): score the step; keep > 0: compact to keep entries
    # Token histories, only on the rows whose sampling reads them (see SamplingParams.reads_*):
    prompt_token_ids: tuple[int, ...] | None = None  # repetition penalty, or prompt logprobs still to score
    output_token_ids: tuple[int, ...] | None = None  # tokens generated before this step: penalties, min_tokens
    draft_probs: torch.Tensor | None = None  # [num_spec_tokens, V]: a sampling draft model's q of each guess
    # Structured output, on sampling rows with a grammar: [num_spec_tokens + 1, ceil(V / 32)] int32,
    # bit t of row j set when token t may be sampled at the row's j-th sampled position.
    grammar_bitmask: torch.Tensor | None = None

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]  # single-token rows first, then multi-token rows
    num_batched_tokens: int
    preempted_ids: tuple[str, ...]
    finished_seq_ids: tuple[int, ...] = ()  # sequences finished since the last output: the runner drops their state

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
