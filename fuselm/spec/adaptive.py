"""How many tokens to speculate this step: the k that maximises expected tokens per second.

Two things decide whether verifying k more tokens per request pays: how likely they are to be
accepted, and what the extra tokens cost in the step. Both are measured while the engine runs:

- StepCostModel fits step time = fixed + per_token * tokens to the engine's own steps
  (exponentially weighted least squares, the slope pulled towards a weak prior when the steps seen
  so far all had about the same size). On a CPU at batch 1 the fixed part dominates, so extra
  tokens are almost free; at batch 32 they are not.
- AcceptanceTracker keeps, per request, decayed counts of accepted and rejected proposal
  positions (acceptance stops at the first rejection, so those are the Bernoulli trials seen).
  With per-token acceptance a, k proposed tokens yield (1 - a^(k+1)) / (1 - a) tokens on average,
  the bonus token included. Counts drift back to the running average when a request is not
  verified, so a request that once did badly is tried again later.

`choose_k` evaluates k = 0..k_max with these and returns the best (0: no speculation this step).
"""

from __future__ import annotations


class StepCostModel:
    def __init__(self, decay: float = 0.97, prior_tokens_to_double: float = 64.0, prior_weight: float = 50.0) -> None:
        self.decay = decay
        self.prior_tokens_to_double = prior_tokens_to_double
        self.prior_weight = prior_weight
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
        prior_slope = my / (self.prior_tokens_to_double + mx)
        slope = max(0.0, (cov + self.prior_weight * prior_slope) / (max(var, 0.0) + self.prior_weight))
        return max(0.0, my - slope * mx), slope

    def predict(self, tokens: float) -> float:
        fixed, per_token = self.coefficients()
        return fixed + per_token * tokens


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens emitted by one verification of k proposals with per-token acceptance `acceptance` (bonus included)."""
    if acceptance >= 0.999:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


class AcceptanceTracker:
    def __init__(self, decay: float = 0.8, prior: float = 0.5, prior_count: float = 2.0) -> None:
        self.decay = decay
        self.prior_count = prior_count
        self.global_accepted = prior * prior_count  # running totals over every request (decayed slowly)
        self.global_rejected = (1.0 - prior) * prior_count
        self._counts: dict[int, list] = {}  # id(request) -> [request, accepted, rejected]

    @property
    def global_rate(self) -> float:
        return self.global_accepted / (self.global_accepted + self.global_rejected)

    def rate(self, request) -> float:
        entry = self._counts.get(id(request))
        if entry is None or entry[0] is not request:
            return self.global_rate
        return entry[1] / (entry[1] + entry[2])

    def _entry(self, request) -> list:
        entry = self._counts.get(id(request))
        if entry is None or entry[0] is not request:
            g = self.global_rate * self.prior_count
            entry = self._counts[id(request)] = [request, g, self.prior_count - g]
        return entry

    def record(self, request, num_proposed: int, num_accepted: int) -> None:
        rejected = 1.0 if num_accepted < num_proposed else 0.0
        entry = self._entry(request)
        entry[1] = entry[1] * self.decay + num_accepted
        entry[2] = entry[2] * self.decay + rejected
        self.global_accepted = self.global_accepted * 0.99 + num_accepted
        self.global_rejected = self.global_rejected * 0.99 + rejected

    def relax(self, request) -> None:
        """A decoding request not verified this step drifts back towards the running average."""
        entry = self._counts.get(id(request))
        if entry is None or entry[0] is not request:
            return
        g = self.global_rate * self.prior_count
        entry[1] += (g - entry[1]) * 0.05
        entry[2] += (self.prior_count - g - entry[2]) * 0.05

    def release_finished(self) -> None:
        for key in [key for key, e in self._counts.items() if e[0].is_finished]:
            del self._counts[key]


def choose_k(acceptances: list[float], caps: list[int], k_max: int, base_tokens: int, target: StepCostModel,
             draft: StepCostModel | None = None, min_gain: float = 1.03) -> int:
    """The k in 0..k_max with the most expected tokens per second.

    acceptances/caps: per decoding request, its acceptance estimate and the most tokens it can take
    (proposal length, room before max_tokens). base_tokens: the step's tokens without speculation.
    draft: the proposer's per-round cost (draft model), or None when proposing is free (ngram).
    Speculation is chosen only when it beats k = 0 by `min_gain`.
    """
    if not acceptances or not target.fitted:
        return 0
    rate0 = len(acceptances) / target.predict(base_tokens)
    best_k, best_rate = 0, rate0 * min_gain
    for k in range(1, k_max + 1):
        extra = sum(min(k, c) for c in caps)
        if extra == 0:
            break
        seconds = target.predict(base_tokens + extra)
        if draft is not None:
            seconds += k * draft.predict(len(acceptances))
        rate = sum(expected_tokens(a, min(k, c)) for a, c in zip(acceptances, caps)) / seconds
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k
