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
prompt tokens (never fewer than `min_chunk`), so no decode waits more than about s times its
usual inter-token time; steps without decodes keep the whole budget. Both costs are refit from
every step (decode-only steps give the decode time by batch size; steps with prompt tokens
give the cost of their chunks on top of it), so the cap follows the machine and the model.

A chunk's cost depends on where it starts: its queries attend to every earlier token, so on a
2-vCPU EPYC a 32-token chunk of SmolLM2 took 106 ms at context 0 and 275 ms at context 2,900.
The chunk cost is therefore fitted as a per token + b per (query, key) pair it attends to, and the
cap is solved for the deepest context being prefilled: with one average per token, chunks deep
into a 3,000-token prompt overran the cap (p99 ITL 2.35x the median at max_decode_slowdown 2).
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


class ChunkCost:
    """seconds = a * tokens + b * pairs / PAIR_UNIT for steps' prompt chunks, fitted by decayed least
    squares weighted by 1 / tokens (with no pairs this is total seconds / total tokens, recent steps
    counting most). A light ridge on b keeps it at 0 until the steps seen differ in context depth."""

    PAIR_UNIT = 1024.0  # pairs are counted in tokens x 1,024 keys, so a and b have similar scales
    RIDGE = 1e-3

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.sp = self.sa = self.saa = self.sy = self.say = 0.0

    def observe(self, tokens: int, pairs: float, seconds: float) -> None:
        if tokens <= 0:
            return
        d, a = self.decay, pairs / self.PAIR_UNIT
        self.sp = self.sp * d + tokens
        self.sa = self.sa * d + a
        self.saa = self.saa * d + a * a / tokens
        self.sy = self.sy * d + seconds
        self.say = self.say * d + a * seconds / tokens

    @property
    def measured(self) -> bool:
        return self.sp > 0.0

    def coefficients(self) -> tuple[float, float]:
        """(seconds per prompt token, seconds per PAIR_UNIT attended pairs)."""
        if not self.measured:
            return 0.0, 0.0
        ridge = self.RIDGE * (self.sp + self.saa) + 1e-12
        det = self.sp * (self.saa + ridge) - self.sa * self.sa
        a = (self.sy * (self.saa + ridge) - self.sa * self.say) / det
        b = (self.sp * self.say - self.sa * self.sy) / det
        if b < 0.0:
            return max(self.sy / self.sp, 0.0), 0.0
        if a < 0.0:
            return 0.0, max(self.say / (self.saa + ridge), 0.0)
        return a, b

    def predict(self, tokens: float, context: float) -> float:
        """Seconds for a chunk of `tokens` starting after `context` cached tokens."""
        a, b = self.coefficients()
        return a * tokens + b * attended_pairs(tokens, context) / self.PAIR_UNIT

    def max_tokens(self, seconds: float, context: float) -> float:
        """Most tokens of a chunk starting at `context` that fit in `seconds` (the positive root)."""
        a, b = self.coefficients()
        quad = b / (2.0 * self.PAIR_UNIT)  # pairs(n, c) = n * c + n * (n + 1) / 2
        lin = a + b * (context + 0.5) / self.PAIR_UNIT
        if quad <= 0.0:
            return seconds / max(lin, 1e-12)
        return (-lin + (lin * lin + 4.0 * quad * seconds) ** 0.5) / (2.0 * quad)


def attended_pairs(tokens: float, context: float) -> float:
    """(query, key) pairs of a chunk of `tokens` queries after `context` cached tokens, causal."""
    return tokens * context + tokens * (tokens + 1) / 2.0


class PromptChunkLimiter:
    MIN_PROMPT_TOKENS = 8  # steps with fewer prompt tokens say too little about their per-token cost

    def __init__(self, max_decode_slowdown: float, min_chunk: int = 16, decay: float = 0.9) -> None:
        self.max_decode_slowdown = max_decode_slowdown
        self.min_chunk = min_chunk
        self.decode = StepCostModel()  # decode-only steps: seconds by number of decoding rows
        self.chunks = ChunkCost(decay)  # the extra seconds of steps with prompt tokens

    @property
    def seconds_per_prompt_token(self) -> float | None:
        """The fitted cost of a prompt token at context 0 (None before any step with prompt tokens)."""
        return self.chunks.coefficients()[0] if self.chunks.measured else None

    def cap(self, num_decodes: int, context: int = 0) -> int | None:
        """Most prompt tokens a step with `num_decodes` decoding rows may add, for a chunk starting
        after `context` cached tokens; None = no cap (no decodes running, or nothing measured yet)."""
        if num_decodes == 0 or not self.chunks.measured or not self.decode.fitted:
            return None
        seconds = (self.max_decode_slowdown - 1.0) * self.decode.predict(num_decodes)
        return max(self.min_chunk, int(self.chunks.max_tokens(seconds, context)))

    def observe(self, num_decodes: int, num_prompt_tokens: int, seconds: float, attended: float | None = None) -> None:
        """A finished step (without speculative tokens): its decoding rows, prompt tokens, duration, and
        the (query, key) pairs its prompt chunks attended to (None: chunks at context 0)."""
        if num_prompt_tokens == 0:
            if num_decodes:
                self.decode.observe(num_decodes, seconds)
            return
        if num_prompt_tokens < self.MIN_PROMPT_TOKENS or (num_decodes and not self.decode.fitted):
            return
        extra = seconds - (self.decode.predict(num_decodes) if num_decodes else self.decode.coefficients()[0])
        if attended is None:
            attended = attended_pairs(num_prompt_tokens, 0)
        self.chunks.observe(num_prompt_tokens, attended, max(extra, 0.0))
