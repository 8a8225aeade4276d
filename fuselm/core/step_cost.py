"""What a step costs, measured while the engine runs, and the prompt-chunk cap it implies.

`StepCostModel` fits step time = fixed + per_token * tokens (exponentially weighted least squares,
the slope pulled towards a weak prior while the steps seen so far all had about the same size).
The speculator uses it to price proposed tokens (fuselm/spec/adaptive.py).

`PromptChunkLimiter` is Sarathi-Serve's latency-derived token budget, measured instead of
profiled up front. A token budget alone does not bound the stall a prompt chunk puts on running
decodes: on a CPU a decode step of a small model is weight-streaming bound (~35 ms for SmolLM2 in
float32 on 2 cores) while prompt tokens are compute bound (~1.5 ms each), so a 512-token chunk
makes that step 20x slower for every decoding request. With `max_decode_slowdown` = s, a step
that has decodes running gets at most (s - 1) * decode_step_time / seconds_per_prompt_token
prompt tokens (never fewer than `min_chunk`, so prompts always progress), so no decode waits
more than about s times its usual inter-token time; steps without decodes keep the whole
budget. Both costs are refit from every step (decode-only steps give the decode time by batch
size; steps with prompt tokens give the cost per prompt token on top of it), so the cap follows
the machine, the model and the context lengths.

The floor is small on purpose. One average cost per prompt token undercharges chunks deep into a
long prompt, whose every query attends to thousands of earlier tokens, and there the cap falls
below the floor: the floor is what such steps get. With a floor of one KV block (16 tokens), a
16-token chunk at context 2,900 cost ~75 ms on top of a ~55 ms decode step (SmolLM2, float32,
2-vCPU EPYC), and p99 ITL was 2.17-2.18x the median at max_decode_slowdown 1.5 (two runs of
benchmarks/run_all.py's long-prompt phase); with 4 tokens it was 1.46x in both, for a p99 TTFT of
32-33 s instead of 16 s. A chunk need not fill a block.
"""

from __future__ import annotations


class StepCostModel:
    def __init__(self, decay: float = 0.97, prior_tokens_to_double: float = 64.0, prior_weight: float = 50.0) -> None:
        self.decay = decay
        self.prior_tokens_to_double = prior_tokens_to_double
        self.prior_weight = prior_weight
        # seconds per token when something measured it (the speculator sets it from prompt chunks:
        # on a CPU the extra tokens of a verification are compute bound too); None: the step's own
        # time spread over `prior_tokens_to_double` more tokens
        self.prior_slope: float | None = None
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.w = self.w * d + 1.0
        self.sx = self.sx * d + tokens
        self.sy = self.sy * d + seconds
        self.sxx = self.sxx * d + tokens * tokens
        self.sxy = self.sxy * d + tokens * seconds

    @property
    def fitted(self) -> bool:
        return self.w >= 3.0

    def coefficients(self) -> tuple[float, float]:
        """(fixed seconds, seconds per token)."""
        if self.w == 0.0:
            return 0.0, 0.0
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx - self.w * mx * mx
        cov = self.sxy - self.w * mx * my
        prior_slope = self.prior_slope if self.prior_slope is not None else my / (self.prior_tokens_to_double + mx)
        slope = max(0.0, (cov + self.prior_weight * prior_slope) / (max(var, 0.0) + self.prior_weight))
        return max(0.0, my - slope * mx), slope

    def predict(self, tokens: float) -> float:
        fixed, per_token = self.coefficients()
        return fixed + per_token * tokens


class PerTokenCost:
    """Seconds per token from a stream of (seconds, tokens) measurements: decayed sums, so recent
    steps count most and each counts by its tokens."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.seconds = self.tokens = 0.0

    def observe(self, seconds: float, tokens: int) -> None:
        self.seconds = self.seconds * self.decay + seconds
        self.tokens = self.tokens * self.decay + tokens

    @property
    def value(self) -> float | None:
        return self.seconds / self.tokens if self.tokens > 0 else None


class PromptChunkLimiter:
    MIN_PROMPT_TOKENS = 8  # steps with fewer prompt tokens say too little about their per-token cost
    MIN_CHUNK = 4  # the floor of the cap (module docstring)

    def __init__(self, max_decode_slowdown: float, min_chunk: int = MIN_CHUNK, decay: float = 0.9) -> None:
        self.max_decode_slowdown = max_decode_slowdown
        self.min_chunk = min_chunk
        self.decode = StepCostModel()  # decode-only steps: seconds by number of decoding rows
        self._prompt = PerTokenCost(decay)  # the extra seconds of steps with prompt tokens, per prompt token

    @property
    def seconds_per_prompt_token(self) -> float | None:
        return self._prompt.value

    def cap(self, num_decodes: int) -> int | None:
        """Most prompt tokens a step with `num_decodes` decoding rows may add; None = no cap (no decodes
        running, or nothing measured yet)."""
        per_token = self.seconds_per_prompt_token
        if num_decodes == 0 or per_token is None or not self.decode.fitted:
            return None
        allowed = (self.max_decode_slowdown - 1.0) * self.decode.predict(num_decodes) / max(per_token, 1e-9)
        return max(self.min_chunk, int(allowed))

    def observe(self, num_decodes: int, num_prompt_tokens: int, seconds: float) -> None:
        """A finished step (without speculative tokens): its decoding rows, prompt tokens and duration."""
        if num_prompt_tokens == 0:
            if num_decodes:
                self.decode.observe(num_decodes, seconds)
            return
        if num_prompt_tokens < self.MIN_PROMPT_TOKENS or (num_decodes and not self.decode.fitted):
            return
        extra = seconds - (self.decode.predict(num_decodes) if num_decodes else self.decode.coefficients()[0])
        self._prompt.observe(max(extra, 0.0), num_prompt_tokens)
