"""Batched token sampler: turns one engine step's logits into one token per row.

The model runner calls `Sampler` once per step with the logits of every row that needs a sample.
All work on the vocabulary is vectorised over the batch; the only Python loops walk the rows, to
build small index tensors (banned ids, penalty token ids) and to draw a seeded row's noise from
its own generator, so a seeded request samples the same tokens whatever else shares its batch.

Order of processing (vLLM semantics):
  raw logprobs (log_softmax of the untouched logits, only when some row asks)
  -> token constraints (runner/logits_processors.py): grammar bitmask, allowed_token_ids,
     bad_words, logit_bias
  -> min_tokens ban of EOS + stop_token_ids -> repetition penalty -> frequency/presence penalty
  -> greedy rows: argmax
  -> other rows: temperature -> top_k -> top_p -> min_p -> exponential-race sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fuselm.runner.logits_processors import apply_token_constraints, needs_token_constraints
from fuselm.sampling_params import SamplingParams

_NEG_INF = float("-inf")
# Temperatures below this are treated as greedy: dividing by them would overflow float32.
_MIN_TEMPERATURE = 1e-5
# Floor for the exponential noise: a draw of exactly 0 would turn 0/0 into NaN in the race.
_TINY = torch.finfo(torch.float32).tiny
# On CPU, top_p first looks at this many best tokens and sorts the whole row only if they fall short.
_CPU_CANDIDATES = 1024


@dataclass
class SamplingBatch:
    params: list[SamplingParams]  # one per row
    generators: list[torch.Generator | None]  # per row; the request's own generator when seeded
    prompt_token_ids: list[list[int]]  # per row
    output_token_ids: list[list[int]]  # per row: tokens generated before this step
    eos_token_ids: list[int]  # the model's EOS ids (banned while len(output) < min_tokens)
    token_bitmasks: list[torch.Tensor | None] | None = None  # per row: a grammar's packed [ceil(V/32)] int32 mask


@dataclass(slots=True)
class SampledToken:
    """One emitted token, with its raw logprob, rank and top-N when the request asked for them."""

    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top: list[tuple[int, float]] | None = None  # top-N (token id, logprob)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, raw logprob of the sampled token
    ranks: torch.Tensor | None  # [B] int64, 1 = most likely
    top_ids: torch.Tensor | None  # [B, N] int64, N = max logprobs asked in the batch
    top_logprobs: torch.Tensor | None  # [B, N] float32


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprob and rank of `token_ids` under softmax(logits), plus the `num_top` best tokens.

    Rank is 1 + the number of tokens strictly more likely than the given one. `num_top` is
    clamped to the vocabulary size; N may be 0 (empty [T, 0] tensors).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    chosen = logprobs.gather(1, token_ids.long().view(-1, 1))  # [T, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [T] int64
    num_top = min(max(num_top, 0), logprobs.shape[1])
    if num_top > 0:
        top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)  # [T, N], [T, N]
    else:
        top_ids = logprobs.new_empty((logprobs.shape[0], 0), dtype=torch.long)  # [T, 0]
        top_logprobs = logprobs.new_empty((logprobs.shape[0], 0))  # [T, 0]
    return chosen.squeeze(1), ranks, top_ids, top_logprobs


def is_greedy(p: SamplingParams) -> bool:
    """The one rule for which requests take the argmax (the sampler, verification and the draft model
    all ask here): temperature 0 (or too small to divide by) or top_k = 1."""
    return p.temperature < _MIN_TEMPERATURE or p.top_k == 1


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _flat_ids(token_lists: list[list[int]], rows: list[int], vocab: int) -> torch.Tensor:
    """Concatenate per-row token ids as flat ids row * vocab + token: [n] int64 on the CPU."""
    tokens = torch.tensor([t for toks in token_lists for t in toks], dtype=torch.long)  # [n]
    lengths = torch.tensor([len(toks) for toks in token_lists], dtype=torch.long)  # [R]
    offsets = torch.tensor(rows, dtype=torch.long) * vocab  # [R]
    return tokens + offsets.repeat_interleave(lengths)  # [n]


class Sampler:
    """Stateless; one instance per runner. Call it once per engine step."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        params = batch.params
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits must be [B, V] with B={len(params)} rows, got {tuple(logits.shape)}")
        sample_rows = [i for i, p in enumerate(params) if not is_greedy(p)]
        if not sample_rows and not self._needs_penalize(batch):
            token_ids = logits.max(dim=-1).indices  # [B]; max() is ~3x faster than argmax() on CPU, same first-index ties
        else:
            x = self.penalize(logits, batch)  # [B, V] float32, a fresh tensor
            token_ids = self._sample(x, batch, sample_rows)  # [B]

        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if not wanted:
            return SamplerOutput(token_ids, None, None, None, None)
        # `logits` is still untouched: penalize() works on a copy, so these are raw logprobs.
        lp, ranks, top_ids, top_lp = compute_logprobs(logits, token_ids, max(wanted))
        return SamplerOutput(token_ids, lp, ranks, top_ids, top_lp)

    # ---------------------------------------------------------------- penalties

    @staticmethod
    def _needs_penalize(batch: SamplingBatch) -> bool:
        masks = batch.token_bitmasks or [None] * len(batch.params)
        for p, out, mask in zip(batch.params, batch.output_token_ids, masks):
            if _has_penalty(p) or len(out) < p.min_tokens or needs_token_constraints(p, mask):
                return True
        return False

    def penalize(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Return a float32 copy of `logits` with the token constraints, the min_tokens ban and all
        penalties applied.

        Penalties only touch ids a row has seen, so they are applied sparsely: gather those
        logits, penalise them, scatter them back (no dense [B, V] pass beyond the copy).
        """
        x = logits.to(torch.float32, copy=True, memory_format=torch.contiguous_format)  # [B, V]
        if batch.token_bitmasks is not None or any(needs_token_constraints(p, None) for p in batch.params):
            apply_token_constraints(x, batch.params, batch.output_token_ids, batch.token_bitmasks)
        vocab, dev = x.shape[1], x.device
        bans: list[tuple[int, int]] = []
        rep_lists: list[list[int]] = []  # prompt + output ids of repetition-penalty rows
        rep_rows: list[int] = []
        out_lists: list[list[int]] = []  # output ids of frequency/presence rows
        out_rows: list[int] = []
        table: list[tuple[float, float, float]] = []  # per row: repetition, frequency, presence
        rows = zip(batch.params, batch.prompt_token_ids, batch.output_token_ids)
        for i, (p, prompt, out) in enumerate(rows):
            if len(out) < p.min_tokens:
                ids = (*batch.eos_token_ids, *(p.stop_token_ids or ()))
                bans.extend((i, t) for t in ids if 0 <= t < vocab)
            table.append((p.repetition_penalty, p.frequency_penalty, p.presence_penalty))
            if p.repetition_penalty != 1.0:
                rep_lists.append(prompt + out)
                rep_rows.append(i)
            if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and out:
                out_lists.append(out)
                out_rows.append(i)

        if bans:
            ban = torch.tensor(bans, dtype=torch.long).to(dev)  # [nb, 2] (row, token)
            x[ban[:, 0], ban[:, 1]] = _NEG_INF
        if not rep_rows and not out_rows:
            return x
        out_ids = _flat_ids(out_lists, out_rows, vocab)  # [m]
        idx = torch.cat([_flat_ids(rep_lists, rep_rows, vocab), out_ids]).to(dev)  # [n], duplicates allowed
        pen = torch.tensor(table, dtype=torch.float32).to(dev)[idx // vocab]  # [n, 3]
        flat = x.view(-1)  # [B * V]
        vals = flat[idx]  # [n]
        if rep_rows:  # HF/vLLM: seen ids get logit / p when positive, else logit * p
            vals = torch.where(vals > 0, vals / pen[:, 0], vals * pen[:, 0])  # [n]
        if out_rows:  # OpenAI: logit -= freq * count + presence * (count > 0), counts over output ids
            out_sorted = out_ids.to(dev).sort().values  # [m]
            count = (torch.searchsorted(out_sorted, idx, right=True)
                     - torch.searchsorted(out_sorted, idx)).to(torch.float32)  # [n]
            vals = vals - pen[:, 1] * count - pen[:, 2] * (count > 0).to(torch.float32)  # [n]
        flat[idx] = vals  # duplicate ids carry identical values, so the write order is irrelevant
        return x

    # ---------------------------------------------------------------- sampling

    def _sample(self, x: torch.Tensor, batch: SamplingBatch, rows: list[int]) -> torch.Tensor:
        """Greedy rows take the argmax of `x`; the `rows` that sample go through the race."""
        num_rows, vocab = x.shape
        dev = x.device
        if len(rows) < num_rows:
            greedy_ids = x.argmax(dim=-1)  # [B], taken before temperature touches x
            if not rows:
                return greedy_ids
        if len(rows) == num_rows:
            xs, idx = x, None  # [S, V], S = B; x is ours to modify in place
        else:
            idx = torch.tensor(rows, dtype=torch.long).to(dev)  # [S]
            xs = x.index_select(0, idx)  # [S, V]

        probs = self._distribution(xs, [batch.params[i] for i in rows])  # [S, V], unnormalised after min_p
        noise = self._noise(probs, [batch.generators[i] for i in rows])  # [S, V]
        sampled = probs.div_(noise).argmax(dim=-1)  # [S]
        if idx is None:
            return sampled
        return greedy_ids.index_copy(0, idx, sampled)  # [B]

    def probabilities(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The distribution each row would be sampled from: [B, V] float32, rows summing to 1.

        Penalties, temperature, top_k, top_p and min_p applied, as in sampling. Speculative
        rejection sampling needs these probabilities rather than one draw. Rows must not be greedy.
        """
        assert not any(is_greedy(p) for p in batch.params), "greedy rows have no distribution: use the argmax"
        probs = self._distribution(self.penalize(logits, batch), batch.params)  # [B, V]
        return probs.div_(probs.sum(dim=-1, keepdim=True))

    @staticmethod
    def _distribution(xs: torch.Tensor, sp: list[SamplingParams]) -> torch.Tensor:
        """Temperature, top_k, top_p and min_p on penalised logits xs [S, V] (modified in place).

        Returns softmax probabilities [S, V] with min_p's cut tokens zeroed (not renormalised).
        """
        vocab = xs.shape[1]
        dev = xs.device
        ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in sp]  # 0: off
        use_temp = any(p.temperature != 1.0 for p in sp)
        use_p = any(p.top_p < 1.0 for p in sp)
        use_min_p = any(p.min_p > 0.0 for p in sp)
        if use_temp or use_p or use_min_p or any(ks):
            # One host->device copy for every per-row knob. top_p == 1 rows get a threshold of 2,
            # so float rounding in a cumsum can never drop one of their tokens.
            table = torch.tensor(
                [(p.temperature, p.top_p if p.top_p < 1.0 else 2.0, p.min_p, k) for p, k in zip(sp, ks)],
                dtype=torch.float32,
            ).to(dev)  # [S, 4]
            if use_temp:
                xs.div_(table[:, 0:1])  # [S, V]
            if use_p or any(ks):
                xs = Sampler._truncate(xs, ks, table[:, 3:4].long(), table[:, 1:2], use_p)  # [S, V]
        probs = torch.softmax(xs, dim=-1)  # [S, V]
        if use_min_p:
            cutoff = probs.amax(dim=-1, keepdim=True) * table[:, 2:3]  # [S, 1]
            probs.masked_fill_(probs < cutoff, 0.0)  # [S, V]; the race needs no renormalising
        return probs

    @staticmethod
    def _truncate(
        xs: torch.Tensor, ks: list[int], k: torch.Tensor, top_p: torch.Tensor, use_p: bool
    ) -> torch.Tensor:
        """Apply top_k, then top_p on the top-k-renormalised distribution, as one logit cutoff per row.

        k: [S, 1] int64 (0 = off); top_p: [S, 1] (> 1 = off). Tokens tied with a row's cutoff
        logit are kept with it, so a tie can keep more than k.
        """
        vocab = xs.shape[1]
        cutoff = None
        if use_p and xs.device.type == "cpu" and vocab > _CPU_CANDIDATES and not all(ks) \
                and max(ks) <= _CPU_CANDIDATES:
            # On CPU a full-vocabulary sort dominates the step, and a host-side check is free:
            # try the best _CPU_CANDIDATES first. (On GPUs the sort is cheap and a check would sync.)
            cutoff = _rank_cutoff(xs, k, top_p, _CPU_CANDIDATES, use_p, check_cover=True)
        if cutoff is None:
            num = max(ks) if all(ks) else vocab  # every row keeps at most `num` tokens
            cutoff = _rank_cutoff(xs, k, top_p, num, use_p, check_cover=False)
        return xs.masked_fill(xs < cutoff, _NEG_INF)  # [S, V]

    @staticmethod
    def _noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Exp(1) noise [S, V] as -log(U): seeded rows from their own generator, the rest in one draw.

        -log(uniform) rather than exponential_(): the same law, several times faster on CPU.
        """
        noise = torch.empty_like(probs)  # [S, V]
        seeded = [(r, g) for r, g in enumerate(generators) if g is not None]
        if len(seeded) < len(generators):
            noise.uniform_()  # default RNG, one call for the whole batch
        for r, gen in seeded:
            if gen.device == noise.device:
                noise[r].uniform_(generator=gen)  # [V]
            else:  # e.g. a CPU generator with CUDA logits: draw where the generator lives, then copy
                noise[r].copy_(torch.empty(probs.shape[1], device=gen.device).uniform_(generator=gen))  # [V]
        return noise.log_().neg_().clamp_min_(_TINY)  # [S, V]; a 0 would make 0/0 = NaN in the race


def _rank_cutoff(
    xs: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, num: int, use_p: bool, check_cover: bool
) -> torch.Tensor | None:
    """Smallest logit each row keeps under top_k then top_p, looking only at its `num` best tokens.

    Every row's k must be 0 (off) or <= num. Returns [S, 1] (-inf: keep everything), or None
    when check_cover is set and some row's top_p set may reach past the `num` candidates (the
    caller then retries with the whole vocabulary).
    """
    vocab = xs.shape[1]
    if num < vocab:
        cand = xs.topk(num, dim=-1).values  # [S, num], descending
    else:
        cand = xs.sort(dim=-1, descending=True).values  # [S, V]
    k_off = k == 0  # [S, 1]
    pos = torch.arange(num, device=xs.device).unsqueeze(0)  # [1, num]
    cand = cand.masked_fill((pos >= k) & ~k_off, _NEG_INF)  # [S, num], top-k applied
    if use_p:
        # Normaliser: the top-k set when k is on, else the whole row (the candidates may be a subset).
        lse = cand.logsumexp(dim=-1, keepdim=True)  # [S, 1]
        if check_cover:  # candidate mode: rows with k off need the whole row's normaliser
            lse = torch.where(k_off, xs.logsumexp(dim=-1, keepdim=True), lse)  # [S, 1]
        probs = (cand - lse).exp_()  # [S, num]
        cum = probs.cumsum(dim=-1)  # [S, num]
        if check_cover and not bool(((cum[:, -1:] >= top_p) | ~k_off | (top_p > 1.0)).all()):
            return None
        cand = cand.masked_fill(cum - probs >= top_p, _NEG_INF)  # [S, num], drop once mass >= top_p
    kept = (cand > _NEG_INF).sum(dim=-1, keepdim=True).clamp_min_(1)  # [S, 1]
    cutoff = cand.gather(1, kept - 1)  # [S, 1], the last kept logit
    return cutoff.masked_fill_(k_off & (top_p > 1.0), _NEG_INF)  # rows with neither keep everything
