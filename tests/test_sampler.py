"""Tests for the batched sampler (fuselm/runner/sampler.py).

Every expectation is computed independently of the sampler: numpy / plain-Python references for
the truncated distributions, the penalties and the logprobs, and a chi-square goodness-of-fit test
(with a fixed torch seed, so the outcome is deterministic) for the sampling frequencies.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fuselm.runner.sampler as sampler_module
from fuselm.runner.sampler import Sampler, SamplingBatch, compute_logprobs
from fuselm.sampling_params import SamplingParams

SAMPLER = Sampler()

# chi-square 0.999 quantiles by degrees of freedom (false-failure rate 1e-3 per test, but seeded).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124}

# Permuted on purpose so that a token's id is not its rank (catches sort/scatter mix-ups).
TINY_LOGITS = [0.5, 2.0, -1.0, 1.0, -2.0, 1.5, 0.0, -0.5]


def make_batch(params, prompts=None, outputs=None, eos=(), generators=None) -> SamplingBatch:
    if generators is None:  # like the runner: one generator per seeded request
        generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]
    empty = [[] for _ in params]
    return SamplingBatch(list(params), list(generators), list(prompts or empty), list(outputs or empty),
                         list(eos))


def expected_dist(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """Plain-Python reference for the truncated, renormalised sampling distribution."""
    z = [v / temperature for v in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = order[:top_k] if top_k > 0 else order
    weights = {i: math.exp(z[i]) for i in keep}
    total = sum(weights.values())
    probs = {i: w / total for i, w in weights.items()}
    if top_p < 1.0:
        kept, mass = [], 0.0
        for i in keep:  # `keep` is in descending order
            kept.append(i)
            mass += probs[i]
            if mass >= top_p:
                break
        probs = {i: probs[i] for i in kept}
    if min_p > 0.0:
        top = max(probs.values())
        probs = {i: q for i, q in probs.items() if q >= min_p * top}
    out = np.zeros(len(logits))
    for i, q in probs.items():
        out[i] = q
    return out / out.sum()


def chi_square_ok(counts: np.ndarray, expected_p: np.ndarray) -> tuple[bool, float, float]:
    support = expected_p > 0
    assert counts[~support].sum() == 0, f"sampled truncated tokens: {counts} vs {expected_p}"
    n = counts.sum()
    exp = expected_p[support] * n
    stat = float(((counts[support] - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    return stat < CHI2_999[df], stat, CHI2_999[df]


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    torch.manual_seed(0)
    logits = torch.randn(16, 300).to(dtype)
    out = SAMPLER(logits, make_batch([SamplingParams(temperature=0.0)] * 16))
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (16,)
    assert out.logprobs is None and out.top_ids is None
    ref = np.argmax(logits.float().numpy(), axis=-1)
    assert out.token_ids.tolist() == ref.tolist()


def test_top_k_one_is_greedy():
    torch.manual_seed(1)
    logits = torch.randn(32, 500) * 3
    plain = SAMPLER(logits, make_batch([SamplingParams(temperature=0.8, top_k=1, top_p=0.5)] * 32))
    assert plain.token_ids.tolist() == np.argmax(logits.numpy(), axis=-1).tolist()
    # With penalties too: top_k=1 is the argmax of the (independently) penalised logits.
    prompts = [[int(t) for t in torch.randint(0, 500, (20,))] for _ in range(32)]
    outputs = [[int(t) for t in torch.randint(0, 500, (10,))] for _ in range(32)]
    p = SamplingParams(temperature=1.5, top_k=1, repetition_penalty=1.7, frequency_penalty=0.5)
    top1 = SAMPLER(logits, make_batch([p] * 32, prompts, outputs)).token_ids.tolist()
    ref = [reference_penalties(logits[i].tolist(), p, prompts[i], outputs[i]) for i in range(32)]
    ref = [int(np.argmax(r)) for r in ref]
    assert top1 == ref
    assert top1 != plain.token_ids.tolist()  # the penalties did change some choices



def _seeded_run(position: int, others: list[SamplingParams], global_seed: int, steps: int = 8) -> list[int]:
    """Sample `steps` tokens for a seeded row placed at `position` among `others`."""
    torch.manual_seed(global_seed)
    target = SamplingParams(temperature=0.9, seed=1234)
    row_logits = torch.linspace(-1, 1, 64)  # [64], fairly flat
    params = list(others)
    params.insert(position, target)
    gens = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]
    history: list[int] = []
    for _ in range(steps):
        logits = torch.randn(len(params), 64) * 2
        logits[position] = row_logits
        outputs = [[1, 2, 3] for _ in params]
        outputs[position] = list(history)
        out = SAMPLER(logits, make_batch(params, outputs=outputs, generators=gens))
        history.append(int(out.token_ids[position]))
    return history


def test_same_seed_same_tokens_regardless_of_batch():
    alone = _seeded_run(0, [], global_seed=0)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_p=0.7, min_p=0.05),
        SamplingParams(temperature=1.2, seed=99, top_k=5),
        SamplingParams(temperature=0.5, repetition_penalty=1.3, presence_penalty=0.4),
        SamplingParams(temperature=1.0),
    ]
    crowded = _seeded_run(3, others, global_seed=7)
    last = _seeded_run(5, others, global_seed=123)
    assert len(set(alone)) > 1  # really random, not a constant
    assert alone == crowded == last
    assert alone == _seeded_run(0, [], global_seed=55)


def test_different_seeds_differ():
    logits = torch.zeros(3, 1000)  # flat distribution
    params = [SamplingParams(seed=1), SamplingParams(seed=2), SamplingParams(seed=1)]
    gens = [torch.Generator().manual_seed(p.seed) for p in params]
    rows = [[], [], []]
    for _ in range(10):
        ids = SAMPLER(logits, make_batch(params, generators=gens)).token_ids.tolist()
        for r, t in zip(rows, ids):
            r.append(t)
    assert rows[0] != rows[1]
    assert rows[0] == rows[2]  # two generators with the same seed agree within one batch


# Each case is one batch whose rows cycle through the listed settings (so the vectorised paths
# see rows with different knobs side by side); every setting is checked on its own rows.
DIST_CASES = {
    "temperature": [dict(temperature=0.7)],
    "top_k": [dict(temperature=1.3, top_k=3)],
    "top_k_mixed_k": [dict(temperature=1.3, top_k=3), dict(top_k=6)],
    "top_k_beside_untruncated": [dict(top_k=2), dict(temperature=0.7)],
    "top_p": [dict(temperature=1.0, top_p=0.8)],
    "top_k_then_top_p": [dict(temperature=1.0, top_k=3, top_p=0.95), dict(temperature=0.8)],
    "min_p": [dict(temperature=1.0, min_p=0.2)],
    "combined": [dict(temperature=1.3, top_k=6, top_p=0.9, min_p=0.15), dict(top_p=0.5), dict(min_p=0.5)],
    "seeded_rows": [dict(top_p=0.95, seeded=True), dict(temperature=1.4, seeded=True)],  # own generator each
}


@pytest.mark.parametrize("case", sorted(DIST_CASES))
def test_sampling_frequencies_match(case):
    settings_ = DIST_CASES[case]
    n = 12000 * len(settings_)
    torch.manual_seed(2024)
    logits = torch.tensor([TINY_LOGITS] * n)  # [n, 8]
    knobs = [{k: v for k, v in kw.items() if k != "seeded"} for kw in settings_]
    seeded = [kw.get("seeded", False) for kw in settings_]
    params = [SamplingParams(**knobs[i % len(knobs)], seed=i if seeded[i % len(knobs)] else None) for i in range(n)]
    ids = SAMPLER(logits, make_batch(params)).token_ids.numpy()
    for j, kwargs in enumerate(knobs):
        counts = np.bincount(ids[j::len(knobs)], minlength=8)
        ok, stat, crit = chi_square_ok(counts, expected_dist(TINY_LOGITS, **kwargs))
        assert ok, f"{case} {kwargs}: chi2={stat:.2f} >= {crit} counts={counts}"


def test_chi_square_detects_a_wrong_distribution():
    """Guard on the harness itself: temperature 0.7 samples must not fit the T=1 distribution."""
    torch.manual_seed(2024)
    logits = torch.tensor([TINY_LOGITS] * 20000)
    ids = SAMPLER(logits, make_batch([SamplingParams(temperature=0.7)] * 20000)).token_ids
    ok, _, _ = chi_square_ok(np.bincount(ids.numpy(), minlength=8), expected_dist(TINY_LOGITS, 1.0))
    assert not ok


@pytest.mark.parametrize("flat_row", [False, True])
def test_cpu_candidate_top_p_matches_full_sort(monkeypatch, flat_row):
    """The CPU top_p shortcut (best-1024 candidates) must truncate exactly like a full sort."""
    vocab, n = 4096, 240
    gen = torch.Generator().manual_seed(17)
    logits = torch.randn(n, vocab, generator=gen)  # [n, V]
    spikes = torch.randint(0, vocab, (n, 12), generator=gen)
    logits.scatter_add_(1, spikes, torch.full((n, 12), 10.0))  # a peaked head, like a real LM
    logits[2::4] = torch.linspace(0.0, -0.5, vocab)  # rows with no truncation, nearly flat
    if flat_row:
        logits[0] = 0.0  # its top_p set needs far more than 1024 tokens: forces the fallback
    kinds = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.7, top_k=50, temperature=0.8),
        SamplingParams(temperature=1.0),
        SamplingParams(top_p=0.9, min_p=0.01, temperature=1.2),
    ]
    params = [kinds[i % len(kinds)] for i in range(n)]
    calls = []
    real = sampler_module._rank_cutoff

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs["check_cover"], out is None))
        return out

    monkeypatch.setattr(sampler_module, "_rank_cutoff", spy)
    torch.manual_seed(3)
    fast = SAMPLER(logits, make_batch(params)).token_ids
    expect = [(True, False)] if not flat_row else [(True, True), (False, False)]
    assert calls == expect
    monkeypatch.setattr(sampler_module, "_CPU_CANDIDATES", 10**9)  # shortcut off: always sort
    torch.manual_seed(3)
    full = SAMPLER(logits, make_batch(params)).token_ids
    assert calls[-1] == (False, False)
    assert torch.equal(fast, full)
    assert (fast[2::4] >= 1024).float().mean() > 0.5  # untruncated rows reach past the candidates
    for i in range(0, n, 7):  # and every sampled token is inside the reference's support
        p = params[i]
        dist = expected_dist(logits[i].tolist(), p.temperature, p.top_k, p.top_p, p.min_p)
        assert dist[int(fast[i])] > 0



def reference_penalties(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list:
    out = list(logits)
    seen = set(prompt) | set(output)
    for v in range(len(out)):
        if p.repetition_penalty != 1.0 and v in seen:
            out[v] = out[v] / p.repetition_penalty if out[v] > 0 else out[v] * p.repetition_penalty
        c = output.count(v)
        out[v] -= p.frequency_penalty * c + p.presence_penalty * (1.0 if c > 0 else 0.0)
    return out


def test_penalties_match_reference():
    rng = np.random.default_rng(3)
    vocab = 40
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(repetition_penalty=0.6, temperature=0.0),
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(presence_penalty=-1.2),
        SamplingParams(repetition_penalty=2.0, frequency_penalty=-0.5, presence_penalty=1.5),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.3),
    ]
    prompts = [list(rng.integers(0, vocab, size=rng.integers(0, 15))) for _ in params]
    outputs = [list(rng.integers(0, vocab, size=rng.integers(0, 25))) for _ in params]
    outputs[6] = []
    prompts = [[int(t) for t in x] for x in prompts]
    outputs = [[int(t) for t in x] for x in outputs]
    logits = torch.from_numpy(rng.normal(size=(len(params), vocab)).astype(np.float32) * 3)
    before = logits.clone()
    batch = make_batch(params, prompts, outputs)
    got = SAMPLER.penalize(logits, batch)
    ref = [reference_penalties(logits[i].tolist(), p, prompts[i], outputs[i]) for i, p in enumerate(params)]
    np.testing.assert_allclose(got.numpy(), np.array(ref), rtol=1e-6, atol=1e-6)
    assert torch.equal(logits, before)  # caller's logits untouched (they feed the raw logprobs)
    # End to end: penalised greedy rows pick the argmax of the reference.
    greedy = [p.clone(temperature=0.0) for p in params]
    ids = SAMPLER(logits, make_batch(greedy, prompts, outputs)).token_ids.tolist()
    assert ids == [int(np.argmax(r)) for r in ref]


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[1.0, 3.0, 2.9, 0.0]])
    p = SamplingParams(temperature=0.0, frequency_penalty=0.5)
    assert SAMPLER(logits, make_batch([p], outputs=[[]])).token_ids.tolist() == [1]
    assert SAMPLER(logits, make_batch([p], outputs=[[1]])).token_ids.tolist() == [2]



def test_min_tokens_bans_eos_and_stop_ids():
    vocab, eos, stop = 12, [5, 6], [7, 999]  # 999 is out of the vocabulary: ignored
    logits = torch.zeros(vocab)
    logits[[5, 6, 7]] = 10.0
    kinds = [
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=stop),
        SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=stop),
        SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=stop, ignore_eos=True),
    ]
    params = kinds * 200
    batch = make_batch(params, outputs=[[1, 2]] * len(params), eos=eos)
    torch.manual_seed(0)
    ids = SAMPLER(logits.expand(len(params), vocab), batch).token_ids.tolist()
    assert not {5, 6, 7} & set(ids)
    assert len(set(ids)) > 3  # the sampled rows spread over the allowed tokens
    # Once min_tokens outputs exist, nothing is banned any more.
    done = SAMPLER(logits.expand(3, vocab), make_batch(kinds, outputs=[[1, 2, 3]] * 3, eos=eos))
    assert done.token_ids[0].item() == 5
    assert set(done.token_ids.tolist()) <= {5, 6, 7}



def test_logprobs_are_raw_and_match_reference():
    rng = np.random.default_rng(5)
    vocab = 50
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.5, top_k=5, logprobs=5, repetition_penalty=1.8),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.2, top_p=0.9, logprobs=0, frequency_penalty=1.0),
        SamplingParams(temperature=0.0, logprobs=1, presence_penalty=2.0),
    ]
    outputs = [[int(t) for t in rng.integers(0, vocab, 10)] for _ in params]
    logits = torch.from_numpy(rng.normal(size=(len(params), vocab)).astype(np.float32) * 2)
    out = SAMPLER(logits, make_batch(params, outputs, outputs))
    ref = np_log_softmax(logits.numpy())
    assert out.top_ids.shape == (5, 5) and out.top_logprobs.shape == (5, 5)
    assert out.logprobs.dtype == torch.float32 and out.ranks.dtype == torch.int64
    check_logprobs(ref, out.token_ids, (out.logprobs, out.ranks, out.top_ids, out.top_logprobs))


def check_logprobs(ref: np.ndarray, tokens: torch.Tensor, got) -> None:
    """Compare (logprob, rank, top_ids, top_logprobs) with a float64 log_softmax reference."""
    lp, rank, top_ids, top_lp = got
    for t, tok in enumerate(tokens.tolist()):
        chosen = ref[t, tok]
        assert lp[t].item() == pytest.approx(chosen, abs=1e-5)
        assert rank[t].item() == 1 + int((ref[t] > chosen + 1e-9).sum())
        order = np.argsort(-ref[t], kind="stable")[: top_ids.shape[1]]
        assert top_ids[t].tolist() == order.tolist()
        np.testing.assert_allclose(top_lp[t].numpy(), ref[t, order], atol=1e-5)


def test_compute_logprobs_direct():
    rng = np.random.default_rng(9)
    logits = torch.from_numpy(rng.normal(size=(7, 30)).astype(np.float32)).to(torch.bfloat16)
    tokens = torch.from_numpy(rng.integers(0, 30, 7))
    got = compute_logprobs(logits, tokens, 4)
    assert got[2].shape == (7, 4)
    check_logprobs(np_log_softmax(logits.float().numpy()), tokens, got)
    _, _, empty_ids, empty_lp = compute_logprobs(logits, tokens, 0)
    assert empty_ids.shape == (7, 0) and empty_lp.shape == (7, 0)



def test_mixed_batch():
    torch.manual_seed(11)
    vocab = 64
    logits = torch.randn(5, vocab) * 2
    prompts = [[int(t) for t in torch.randint(0, vocab, (12,))] for _ in range(5)]
    outputs = [[int(t) for t in torch.randint(0, vocab, (6,))] for _ in range(5)]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=0.9, top_p=0.6),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=0.5, top_k=5, logprobs=2),
    ]
    out = SAMPLER(logits, make_batch(params, prompts, outputs))
    ids = out.token_ids.tolist()
    assert out.token_ids.shape == (5,) and out.top_ids.shape == (5, 2)
    assert ids[0] == int(logits[0].argmax())
    alone = SAMPLER(logits[1:2], make_batch([params[1]], prompts[1:2], outputs[1:2]))
    assert ids[1] == alone.token_ids.item()
    allowed = expected_dist(logits[2].tolist(), temperature=0.9, top_p=0.6) > 0
    assert allowed[ids[2]]
    ref3 = reference_penalties(logits[3].tolist(), params[3], prompts[3], outputs[3])
    assert ids[3] == int(np.argmax(ref3))
    assert ids[4] in torch.topk(logits[4], 5).indices.tolist()
    ref = np_log_softmax(logits.numpy())
    assert out.logprobs[4].item() == pytest.approx(ref[4, ids[4]], abs=1e-5)
    assert out.top_ids[4].tolist() == np.argsort(-ref[4])[:2].tolist()



def allowed_superset(logits: np.ndarray, p: SamplingParams, tol: float = 1e-4) -> np.ndarray:
    """Tokens that the truncation may keep (float64, slack on every threshold, ties kept)."""
    x = logits.astype(np.float64)
    if p.temperature < 1e-5 or p.top_k == 1:
        return x >= x.max() - 1e-6
    z = x / p.temperature
    keep = np.ones_like(z, dtype=bool)
    if 0 < p.top_k < len(z):
        kth = np.sort(z)[::-1][p.top_k - 1]
        keep = z >= kth - 1e-5
    w = np.where(keep, np.exp(z - z.max()), 0.0)
    probs = w / w.sum()
    if p.top_p < 1.0:
        mass_greater = np.array([probs[probs > probs[v] * (1 + 1e-6)].sum() for v in range(len(z))])
        keep &= mass_greater < p.top_p + tol
    if p.min_p > 0.0:
        keep &= np.exp(z - z.max()) >= p.min_p - tol
    return keep


logit_value = st.one_of(
    st.floats(-8.0, 8.0, allow_nan=False, width=32),
    st.sampled_from([0.0, 1.0, -1.0, 3.0]),  # ties
)


@st.composite
def row_cases(draw, vocab: int):
    logits = draw(st.lists(logit_value, min_size=vocab, max_size=vocab))
    params = SamplingParams(
        temperature=draw(st.one_of(st.just(0.0), st.floats(0.05, 3.0))),
        top_k=draw(st.integers(0, vocab + 2)),
        top_p=draw(st.one_of(st.just(1.0), st.floats(0.01, 1.0), st.floats(0.98, 0.9999))),
        min_p=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**31))),
    )
    return logits, params


@st.composite
def batches(draw):
    vocab = draw(st.integers(2, 16))
    return vocab, draw(st.lists(row_cases(vocab), min_size=1, max_size=4))


@settings(max_examples=150, deadline=None)
@given(batches())
def test_property_never_samples_truncated_tokens(case):
    vocab, rows = case
    copies = 16  # each row repeated, so the check sees many draws per example
    logits = torch.tensor([r[0] for r in rows for _ in range(copies)], dtype=torch.float32)
    params = [r[1] for r in rows for _ in range(copies)]
    ids = SAMPLER(logits, make_batch(params)).token_ids
    assert ids.shape == (len(params),) and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < vocab)).all()
    for j, (row_logits, p) in enumerate(rows):
        allowed = allowed_superset(np.array(row_logits, dtype=np.float32), p)
        for t in ids[j * copies:(j + 1) * copies].tolist():
            assert allowed[t], f"token {t} sampled but truncated: logits={row_logits} {p}"
