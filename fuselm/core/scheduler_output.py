"""What the scheduler decided for one step: the model runner's only input.

It lives below the engine so that the runner (which executes it) and the draft-model proposer
(which builds its own for the draft's runner) read the same types without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuselm.core.request import Request


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    request: Request
    num_computed_tokens: int  # K/V already in the cache before this step
    token_ids: tuple[int, ...]  # the tokens to compute this step
    block_ids: tuple[int, ...]
    needs_sample: bool  # True when this step reaches the request's last token
    num_spec_tokens: int = 0  # trailing token_ids that are speculative (proposed, to be verified)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]  # single-token rows first, then multi-token rows
    num_batched_tokens: int
    preempted_ids: tuple[str, ...]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
