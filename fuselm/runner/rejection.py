"""Lossless acceptance of speculative tokens.

Greedy requests accept a proposed token when it equals the target's argmax at that position, so
their output is token-for-token what plain decoding gives. Sampled requests use speculative
rejection sampling (Leviathan et al. 2023; Chen et al. 2023): proposed token d at position i,
drawn from the proposer's distribution q_i, is accepted with probability min(1, p_i(d) / q_i(d));
at the first rejection a token is drawn from the residual max(0, p_i - q_i) normalised, and if
all are accepted one more is drawn from p_{k}. Every emitted token then follows the target
distribution p exactly. A prompt-lookup (ngram) proposal is a point mass: q_i(d) = 1.
"""

from __future__ import annotations

import torch


def greedy_accept(target_ids: list[int], draft_ids: list[int]) -> list[int]:
    """target_ids: the target's choice at each of the len(draft_ids) + 1 positions. Returns the emitted tokens."""
    a = 0
    while a < len(draft_ids) and draft_ids[a] == target_ids[a]:
        a += 1
    return target_ids[:a + 1]


def rejection_sample(target_probs: torch.Tensor, draft_ids: list[int], draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None = None) -> list[int]:
    """Emit the accepted prefix of draft_ids plus one token, each distributed as the target's p.

    target_probs: [k + 1, V], rows summing to 1 (p at each draft position, then the bonus position).
    draft_ids: the k proposed tokens. draft_probs: [k, V] rows of q, or None for point masses.
    """
    k = len(draft_ids)
    dev = generator.device if generator is not None else target_probs.device
    p = target_probs.to(dev, torch.float32)  # [k + 1, V]
    if k:
        d = torch.tensor(draft_ids, dtype=torch.long, device=dev)  # [k]
        rows = torch.arange(k, device=dev)
        p_d = p[rows, d]  # [k]
        if draft_probs is None:
            q = None
            q_d = torch.ones(k, device=dev)
        else:
            q = draft_probs.to(dev, torch.float32)  # [k, V]
            q_d = q[rows, d]  # [k]
        u = torch.rand(k, generator=generator, device=dev)  # [k]
        accepted = (u * q_d < p_d).tolist()  # u < p/q, i.e. accept with probability min(1, p/q)
        a = accepted.index(False) if False in accepted else k
    else:
        a = 0
    if a < k:
        if q is None:
            residual = p[a].clone()
            residual[draft_ids[a]] = 0.0  # max(0, p - onehot(d)) is p with d removed
        else:
            residual = (p[a] - q[a]).clamp_min_(0.0)
        if not float(residual.sum()) > 0.0:  # only reachable through rounding (p == q): then p itself
            residual = p[a]
        last = torch.multinomial(residual, 1, generator=generator)
    else:
        last = torch.multinomial(p[k], 1, generator=generator)
    return list(draft_ids[:a]) + [int(last)]
