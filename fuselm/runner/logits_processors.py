"""Token constraints on a step's logits: grammar bitmasks, allowed_token_ids, bad_words, logit_bias.

The sampler calls `apply_token_constraints` on its float32 copy of the logits before penalties,
temperature, top-k/top-p and greedy argmax (vLLM's order), so a constrained row can only ever
sample an allowed token, greedy or not. Each kind is one tensor op over the whole batch; Python
walks the rows only to gather their small index lists.

Grammar bitmasks come packed, 32 tokens per int32 word (bit t of word w: token 32 w + t), as
xgrammar fills them. Unpacking every bit of a [B, V] batch costs several passes over B x V
integers, and torch's masked_fill is slow on CPU, so words are taken by kind: a word of zeros
bans its 32 tokens by adding -inf through a broadcast add (exact: x + 0 == x), a word of ones
leaves them, and only the few mixed words are unpacked bit by bit. On SmolLM2's vocabulary at
batch 32 that is ~0.3-0.7 ms, against ~3-14 ms for unpacking everything.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def needs_token_constraints(params, bitmask: torch.Tensor | None) -> bool:
    return bitmask is not None or bool(params.logit_bias) or params.allowed_token_ids is not None \
        or bool(params.bad_words)


def apply_token_constraints(x: torch.Tensor, params: list, output_token_ids: list,
                            bitmasks: list[torch.Tensor | None] | None) -> None:
    """x: [B, V] float32, contiguous, modified in place. params / output_token_ids / bitmasks: per
    row (bitmasks[i]: [ceil(V'/32)] int32 with V' >= V, or None)."""
    if bitmasks is not None and any(m is not None for m in bitmasks):
        apply_bitmasks(x, bitmasks)
    allowed_rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    if allowed_rows:
        _apply_allowed(x, allowed_rows, [params[i].allowed_token_ids for i in allowed_rows])
    bans = [(i, t) for i, (p, out) in enumerate(zip(params, output_token_ids)) if p.bad_words
            for t in _bad_word_bans(p.bad_words_token_ids or (), out)]
    vocab = x.shape[1]
    bans = [(i, t) for i, t in bans if t < vocab]
    if bans:
        ban = torch.tensor(bans, dtype=torch.long).to(x.device)  # [nb, 2] (row, token)
        x[ban[:, 0], ban[:, 1]] = _NEG_INF
    biased = [(i, t, b) for i, p in enumerate(params) if p.logit_bias for t, b in p.logit_bias.items() if t < vocab]
    if biased:
        table = torch.tensor(biased, dtype=torch.float64)  # [nb, 3] (row, token, bias); float64 holds ids exactly
        flat = (table[:, 0].long() * vocab + table[:, 1].long()).to(x.device)  # [nb]
        x.view(-1).index_add_(0, flat, table[:, 2].to(device=x.device, dtype=x.dtype))


def apply_bitmasks(x: torch.Tensor, bitmasks: list[torch.Tensor | None]) -> None:
    """-inf on every token whose bit is 0 in its row's packed bitmask; rows without one untouched."""
    rows, vocab = x.shape
    words = (vocab + 31) // 32
    dev = x.device
    packed = torch.full((rows, words), -1, dtype=torch.int32)  # [B, W], all allowed
    for i, m in enumerate(bitmasks):
        if m is not None:
            take = min(words, m.shape[-1])
            packed[i, :take] = m[:take]
            packed[i, take:] = 0  # a mask shorter than the logits allows nothing past its end
    packed = packed.to(dev)
    full = vocab // 32  # whole words; a partial last word is unpacked on its own
    shifts = torch.arange(32, dtype=torch.int32, device=dev)  # [32]
    if full:
        xw = x[:, :full * 32].unflatten(1, (full, 32))  # [B, full, 32], a view of x
        head = packed[:, :full]  # [B, full]
        xw.add_(torch.where(head == 0, _NEG_INF, 0.0).unsqueeze(-1))  # [B, full, 32]; x + 0 == x exactly
        r, w = ((head != 0) & (head != -1)).nonzero(as_tuple=True)  # mixed words: [K], [K]
        if r.numel():
            bits = (head[r, w].unsqueeze(-1) >> shifts) & 1  # [K, 32]
            xw[r, w] = torch.where(bits.bool(), xw[r, w], _NEG_INF)  # [K, 32]
    tail = vocab - full * 32
    if tail:
        bits = (packed[:, full:full + 1] >> shifts[:tail]) & 1  # [B, tail]
        x[:, full * 32:].masked_fill_(bits == 0, _NEG_INF)  # [B, tail]


def _apply_allowed(x: torch.Tensor, rows: list[int], allowed: list[list[int]]) -> None:
    """Rows that name allowed_token_ids: every other token -inf (one additive [R, V] mask)."""
    vocab = x.shape[1]
    keep = [[t for t in ids if t < vocab] for ids in allowed]
    add = torch.full((len(rows), vocab), _NEG_INF, dtype=x.dtype)  # [R, V]
    r = torch.tensor([j for j, ids in enumerate(keep) for _ in ids], dtype=torch.long)  # [n]
    t = torch.tensor([tok for ids in keep for tok in ids], dtype=torch.long)  # [n]
    add[r, t] = 0.0
    x.index_add_(0, torch.tensor(rows, dtype=torch.long).to(x.device), add.to(x.device))  # [B, V]


def _bad_word_bans(sequences, output: list[int] | tuple[int, ...]) -> list[int]:
    """The last token of each bad word whose other tokens end the output so far (vLLM's rule)."""
    bans = []
    for seq in sequences:
        prefix = len(seq) - 1
        if prefix == 0 or (len(output) >= prefix and tuple(output[len(output) - prefix:]) == tuple(seq[:-1])):
            bans.append(seq[-1])
    return bans
