"""Verify one step's speculative tokens: turn the target's logits into each row's emitted tokens.

A row with s speculative tokens brings s + 1 logits rows: at its last real token and at each
speculative token. Position j is scored as if the first j speculative tokens were already output
(penalties, min_tokens and bad_words see them; a grammar row brings one bitmask per position),
which is what plain decoding would have seen had it produced them. Greedy rows and rows without
speculation go through the sampler's batched path in one call; sampled rows with speculation get
their target distributions in one call and then rejection sampling (runner/rejection.py).
"""

from __future__ import annotations

import torch

from fuselm.core.scheduler_output import ScheduledRequest
from fuselm.runner.sampler import SampledToken, Sampler, SamplingBatch, compute_logprobs, is_greedy
from fuselm.runner.rejection import greedy_accept, rejection_sample


def verify_speculative(sampler: Sampler, logits: torch.Tensor, rows: list[ScheduledRequest],
                       generators: list[torch.Generator | None], eos_token_ids: list[int]) -> list[list[SampledToken]]:
    """logits: [sum(1 + s_i), V], rows' positions in order. rows: the ScheduledRequests that sample;
    generators: each row's seeded generator, or None."""
    direct: list[tuple[int, int, tuple[int, ...]]] = []  # (logits row, row index, output history)
    position: dict[int, int] = {}  # logits row -> its position j within the row (its grammar bitmask row)
    dist: list[tuple[int, int, tuple[int, ...]]] = []
    offsets: list[int] = []
    row_drafts: list[list[int]] = []  # each row's speculative tokens
    cursor = 0
    for ri, r in enumerate(rows):
        s = r.num_spec_tokens
        drafts = list(r.token_ids[len(r.token_ids) - s:]) if s else []
        row_drafts.append(drafts)
        target = direct if (s == 0 or is_greedy(r.params)) else dist
        history = r.output_token_ids or ()  # the row carries it when its sampling reads it
        for j in range(s + 1):
            target.append((cursor + j, ri, history + tuple(drafts[:j])))
            position[cursor + j] = j
        offsets.append(cursor)
        cursor += s + 1

    def batch_of(entries):
        picked = [rows[ri] for _, ri, _ in entries]
        return SamplingBatch(params=[r.params for r in picked], generators=[generators[ri] for _, ri, _ in entries],
                             prompt_token_ids=[r.prompt_token_ids or () for r in picked],
                             output_token_ids=[h for _, _, h in entries], eos_token_ids=eos_token_ids,
                             token_bitmasks=[None if rows[ri].grammar_bitmask is None else
                                             rows[ri].grammar_bitmask[position[i]] for i, ri, _ in entries])

    def select(entries):
        return logits[torch.tensor([i for i, _, _ in entries], device=logits.device)]

    chosen: dict[int, int] = {}  # logits row -> the sampler's token (argmax for greedy rows)
    if direct:
        ids = sampler(select(direct), batch_of(direct)).token_ids.tolist()
        chosen = {i: t for (i, _, _), t in zip(direct, ids)}
    probs = sampler.probabilities(select(dist), batch_of(dist)) if dist else None  # [len(dist), V]
    prob_row = {i: j for j, (i, _, _) in enumerate(dist)}

    emitted: list[list[int]] = []
    for ri, r in enumerate(rows):
        s, start, drafts = r.num_spec_tokens, offsets[ri], row_drafts[ri]
        if start in chosen:
            emitted.append(greedy_accept([chosen[start + j] for j in range(s + 1)], drafts))
        else:
            first = prob_row[start]
            emitted.append(rejection_sample(probs[first:first + s + 1], drafts, r.draft_probs, generators[ri]))

    tokens = [[SampledToken(t) for t in toks] for toks in emitted]
    wanted = [(ri, r.params.logprobs) for ri, r in enumerate(rows) if r.params.logprobs is not None]
    if wanted:  # raw logprobs of every emitted token, one call for all rows that asked
        index = [offsets[ri] + j for ri, _ in wanted for j in range(len(emitted[ri]))]
        ids = torch.tensor([t for ri, _ in wanted for t in emitted[ri]], device=logits.device)
        lp, rank, top_ids, top_lp = compute_logprobs(logits[torch.tensor(index, device=logits.device)], ids,
                                                     max(n for _, n in wanted))
        lp, rank, top_ids, top_lp = lp.tolist(), rank.tolist(), top_ids.tolist(), top_lp.tolist()
        k = 0
        for ri, n_top in wanted:
            for tok in tokens[ri]:
                tok.logprob, tok.rank = lp[k], rank[k]
                tok.top = list(zip(top_ids[k][:n_top], top_lp[k][:n_top]))
                k += 1
    return tokens
