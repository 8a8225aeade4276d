"""How many tokens to speculate this step: the plan with the most expected tokens per second.

Two things decide whether verifying k more tokens per request pays: how likely they are to be
accepted, and what the extra tokens cost in the step. Both are measured while the engine runs:

- StepCostModel (fuselm/core/step_cost.py) fits step time = fixed + per_token * tokens to the engine's own decode steps
  (exponentially weighted least squares, the slope pulled towards a weak prior when the steps seen
  so far all had about the same size). On a CPU at batch 1 the fixed part dominates, so extra
  tokens are almost free; at batch 32 they are not.
- AcceptanceTracker estimates P(the first j proposals of a request are accepted): per request
  for the first position, over all requests for each deeper one given the ones before (guesses
  come right in runs). A request's estimate drifts back to the running average while it is not
  verified, so a request that once did badly is tried again later.

`plan_speculation` turns these into how many proposed tokens each request verifies this step.
`RealizedGate` then checks the model against what speculation really delivered: per batch-size
bucket it keeps the measured tokens per second of decode steps with and without speculation,
and switches speculation off in a bucket where it delivers less (the model can be wrong: at
batch 32 it rated guesses as gains that cost 20%). It runs a plain step every 16 speculative
ones to keep the baseline current (a bucket's first steps run slower, touching fresh KV pages), and a speculative one now and then to notice when guesses become good again.
"""

from __future__ import annotations

from fuselm.core.step_cost import StepCostModel


class AcceptanceTracker:
    """P(the first j proposals of a request are all accepted), from what verification has shown.

    Acceptance is bursty: inside a copied span one guess after another is right, so the chance
    that the j-th is accepted given the ones before were is higher than the first's. The tracker
    keeps, per request, decayed counts for the first position, and over all requests the
    conditional rate of each deeper position; P(first j) = first(request) * prod of conditionals.
    """

    MAX_DEPTH = 16

    def __init__(self, decay: float = 0.8, prior: float = 0.5, prior_count: float = 2.0) -> None:
        self.decay = decay
        self.prior = prior
        self.prior_count = prior_count
        # global, per depth j (index j - 1): decayed [accepted, reached] counts, without the prior
        self.depth = [[0.0, 0.0] for _ in range(self.MAX_DEPTH)]
        self._first: dict[int, list] = {}  # id(request) -> [request, accepted, tries] at the first position

    @property
    def global_rate(self) -> float:
        """The first position's acceptance rate over all requests."""
        accepted, reached = self.depth[0]
        return (accepted + self.prior * self.prior_count) / (reached + self.prior_count)

    def conditional_rates(self, cap: int) -> list[float]:
        """P(position j accepted | the ones before were), j = 2..cap. A depth seldom reached borrows
        its prior from the depth before it, not from a fixed 0.5: otherwise a depth the plan never
        tries keeps the prior, looks no better than a coin flip, and is never tried (measured: k
        stuck at 2 with every guess accepted)."""
        out, prev = [], self.global_rate
        for j in range(1, min(cap, self.MAX_DEPTH)):
            accepted, reached = self.depth[j]
            prev = (accepted + self.prior_count * prev) / (reached + self.prior_count)
            out.append(prev)
        return out

    def rate(self, request) -> float:
        """The request's own first-position acceptance estimate."""
        entry = self._first.get(id(request))
        if entry is None or entry[0] is not request:
            return self.global_rate
        return entry[1] / entry[2]

    def gains(self, request, cap: int) -> list[float]:
        """[P(first j proposals accepted) for j = 1..cap]."""
        p = self.rate(request)
        out = [p]
        for rate in self.conditional_rates(cap):
            p *= rate
            out.append(p)
        return out[:cap]

    def record(self, request, num_proposed: int, num_accepted: int) -> None:
        entry = self._first.get(id(request))
        if entry is None or entry[0] is not request:
            entry = self._first[id(request)] = [request, self.global_rate * self.prior_count, self.prior_count]
        entry[1] = entry[1] * self.decay + (num_accepted > 0)
        entry[2] = entry[2] * self.decay + 1.0
        for j in range(min(num_proposed, num_accepted + 1, self.MAX_DEPTH)):  # depths that were evaluated
            counts = self.depth[j]
            counts[0] = counts[0] * 0.99 + (j < num_accepted)
            counts[1] = counts[1] * 0.99 + 1.0

    def relax(self, request) -> None:
        """A decoding request not verified this step drifts back towards the running average."""
        entry = self._first.get(id(request))
        if entry is None or entry[0] is not request:
            return
        entry[1] += (self.global_rate * entry[2] - entry[1]) * 0.05

    def release_finished(self) -> None:
        for key in [key for key, e in self._first.items() if e[0].is_finished]:
            del self._first[key]


def plan_speculation(gains: list[list[float]], base_tokens: int, target: StepCostModel,
                     draft_round: float | None = None, setup: list[float] | None = None,
                     min_gain: float = 1.2) -> list[int]:
    """How many proposed tokens each decoding request verifies this step (0 = none).

    gains: per decoding request, P(its first j proposals are all accepted) for j = 1..the most it
    can take (proposal length, room before max_tokens). base_tokens: the step's tokens without
    speculation. draft_round: seconds of one round of the proposer (a draft model, whose rounds are
    shared by every request), or None when proposing is free (ngram). setup: per request, seconds
    of one-off work its first proposal needs, already spread over the steps it will speculate in
    (a draft model computing a prompt it has not seen), or None.

    The j-th proposed token of a request adds gains[j - 1] expected tokens (it counts only if the
    j - 1 before it were accepted) and one token's cost to the step. Taking candidates best-first, one
    is added while its gain per second beats the step's current tokens per second by `min_gain`:
    at batch 1 almost any guess pays, at batch 32 on a CPU only likely ones do. The 20% margin is
    for the model's error: with 5% an open-ended workload at batch 8 (first guesses accepted 45% of
    the time) lost 17% against not speculating, on guesses the model rated as slight gains.
    With a draft model every depth limit 1..max(caps) is tried with its rounds' cost, each once with
    every request and once with only those that need no setup, and the best plan is kept.
    """
    n = len(gains)
    caps = [len(g) for g in gains]
    if not n or not target.fitted or not any(caps):
        return [0] * n
    setup = setup or [0.0] * n
    fixed, per_token = target.coefficients()
    best_plan, best_rate = [0] * n, n / target.predict(base_tokens)
    depths = range(1, max(caps) + 1) if draft_round is not None else [max(caps)]
    subsets = [range(n)]
    if any(setup):
        subsets.append([r for r in range(n) if not setup[r]])
    for depth in depths:
        for rows in subsets:
            seconds = target.predict(base_tokens) + (depth * draft_round if draft_round is not None else 0.0)
            tokens = float(n)
            candidates = sorted(((g, r) for r in rows for g in gains[r][:depth]), key=lambda c: -c[0])
            plan = [0] * n
            for gain, r in candidates:
                if gain * seconds <= min_gain * tokens * per_token:  # gain / per_token <= min_gain * tokens / seconds
                    break
                plan[r] += 1
                tokens += gain
                seconds += per_token
            seconds += sum(setup[r] for r in range(n) if plan[r])
            rate = tokens / seconds
            if any(plan) and rate > best_rate:
                best_plan, best_rate = plan, rate
    return best_plan


class RealizedGate:
    """Measured tokens/s of decode steps with and without speculation, per batch-size bucket."""

    def __init__(self, baseline_every: int = 16, retry_every: int = 16, min_samples: int = 5, decay: float = 0.8) -> None:
        self.baseline_every = baseline_every
        self.retry_every = retry_every
        self.min_samples = min_samples
        self.decay = decay
        self._buckets: dict[int, dict] = {}

    def _bucket(self, num_decoding: int) -> dict:
        return self._buckets.setdefault(num_decoding.bit_length(), {
            "plain": [0.0, 0.0, 0], "spec": [0.0, 0.0, 0], "since_plain": 0, "since_spec": 0})

    def rate(self, num_decoding: int, kind: str) -> float | None:
        total, weight, count = self._bucket(num_decoding)[kind]
        return total / weight if count >= self.min_samples else None

    def allow(self, num_decoding: int) -> bool:
        """May this step speculate? (Called only when the plan wants to.)"""
        b = self._bucket(num_decoding)
        if b["plain"][2] < self.min_samples or b["since_plain"] >= self.baseline_every:
            return False  # measure the baseline
        spec, plain = self.rate(num_decoding, "spec"), self.rate(num_decoding, "plain")
        if spec is not None and spec < plain:
            return b["since_spec"] >= self.retry_every  # losing: only a retry now and then
        return True

    def observe(self, num_decoding: int, speculated: bool, tokens: int, seconds: float) -> None:
        b = self._bucket(num_decoding)
        entry = b["spec" if speculated else "plain"]
        entry[0] = entry[0] * self.decay + tokens
        entry[1] = entry[1] * self.decay + seconds
        entry[2] += 1
        b["since_spec"] = 0 if speculated else b["since_spec"] + 1
        b["since_plain"] = b["since_plain"] + 1 if speculated else 0
