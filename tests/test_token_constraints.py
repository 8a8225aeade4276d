"""logit_bias, allowed_token_ids, bad_words and grammar bitmasks in the sampler.

The batched bitmask op is checked against a per-bit reference on random masks. On the embedded
model, every expectation comes from the plain model's raw logprobs (returned top-20 per step):
a bias moves the argmax exactly when it closes the logprob gap, a restricted step takes the best
allowed token of the raw distribution, and a bad word's last token gives way to the best other
raw token at the position where plain decoding produced it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuselm import LLM, SamplingParams
from fuselm.errors import InvalidRequestError
from fuselm.runner.logits_processors import apply_bitmasks
from fuselm.runner.sampler import Sampler, SamplingBatch


def reference_mask(logits: torch.Tensor, masks: list) -> torch.Tensor:
    out = logits.clone()
    for i, m in enumerate(masks):
        if m is None:
            continue
        for t in range(logits.shape[1]):
            word = t // 32
            allowed = word < m.shape[0] and (int(m[word]) >> (t % 32)) & 1
            if not allowed:
                out[i, t] = float("-inf")
    return out


@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(1, 200), rows=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       extra_words=st.integers(-1, 2))
def test_bitmask_op_matches_per_bit_reference(vocab, rows, seed, extra_words):
    gen = torch.Generator().manual_seed(seed)
    words = max(1, (vocab + 31) // 32 + extra_words)  # masks a word short of the logits, or longer
    logits = torch.randn(rows, vocab, generator=gen)
    masks = []
    for _ in range(rows):
        kind = int(torch.randint(0, 4, (1,), generator=gen))
        if kind == 0:
            masks.append(None)
            continue
        m = torch.randint(-2**31, 2**31 - 1, (words,), generator=gen, dtype=torch.int64).to(torch.int32)
        m[torch.rand(words, generator=gen) < 0.3] = 0  # whole banned words
        m[torch.rand(words, generator=gen) < 0.3] = -1  # whole allowed words
        masks.append(m)
    x = logits.clone()
    apply_bitmasks(x, masks)
    assert torch.equal(x, reference_mask(logits, masks))


def test_sampler_respects_mask_for_greedy_and_sampled_rows():
    vocab = 100
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    allowed = [[3, 40, 77], [99], [0, 1, 2, 64], [5]]
    masks = []
    for ids in allowed:
        m = torch.zeros(4, dtype=torch.int64)
        for t in ids:
            m[t // 32] |= 1 << (t % 32)
        masks.append(m.to(torch.int32))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.7, top_p=0.5, seed=2)]
    batch = SamplingBatch(params, [None, None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
                          [[]] * 4, [[]] * 4, [], token_bitmasks=masks)
    for _ in range(20):
        ids = Sampler()(logits, batch).token_ids.tolist()
        assert all(t in a for t, a in zip(ids, allowed))
    assert ids[0] == max(allowed[0], key=lambda t: logits[0, t])  # greedy: the best allowed token


# ---------------------------------------------------------------- on the embedded model

@pytest.fixture(scope="module")
def llm():
    # float32: on a CPU with AVX-512-BF16 the default dtype is bfloat16, whose logits (spacing 0.125 near 20)
    # differ between a lone row and a batch by more than the 0.05 margins these tests put around a logprob gap
    return LLM(dtype="float32")


PROMPT = "The capital of France is Paris. The capital of Italy is"


def raw_top(llm: LLM, prompt: str, steps: int):
    """Plain greedy: the tokens and each position's raw top-20 {token: logprob}."""
    params = SamplingParams(temperature=0, max_tokens=steps, logprobs=20, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    return out.token_ids, [{t: lp.logprob for t, lp in pos.items()} for pos in out.logprobs]


def test_logit_bias_moves_argmax_by_the_logprob_gap(llm):
    (first,), (top,) = raw_top(llm, PROMPT, 1)
    ranked = sorted(top, key=lambda t: (-top[t], t))  # argmax order: ties to the lower id
    second = ranked[1]
    gap = top[first] - top[second]
    biases = [{second: gap + 0.05}, {second: gap - 0.05}, {first: -gap - 0.05}, {str(second): gap + 0.05},
              {first: -100.0, second: -100.0}]
    params = [SamplingParams(temperature=0, max_tokens=1, logit_bias=b) for b in biases] + \
             [SamplingParams(temperature=0, max_tokens=1)]
    got = [o.outputs[0].token_ids[0] for o in llm.generate([PROMPT] * len(params), params, use_tqdm=False)]
    assert got[:4] == [second, first, second, second]
    assert got[4] == ranked[2]  # both best tokens pushed down 100: the third is the argmax
    assert got[5] == first  # the unbiased row in the same batch is untouched


def test_allowed_token_ids_take_the_best_allowed_raw_token(llm):
    tokens, tops = raw_top(llm, PROMPT, 6)
    allowed = sorted({t for top in tops for t in list(top)[5:15]})  # middling tokens of each step
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=20, ignore_eos=True, allowed_token_ids=allowed)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    for token, pos in zip(out.token_ids, out.logprobs):
        assert token in allowed
        raw = {t: lp.logprob for t, lp in pos.items()}  # returned logprobs are the raw distribution's
        assert all(raw[token] >= lp for t, lp in raw.items() if t in allowed)
    sampled = SamplingParams(temperature=1.0, seed=4, n=4, max_tokens=8, allowed_token_ids=allowed[:3])
    for completion in llm.generate([PROMPT], sampled, use_tqdm=False)[0].outputs:
        assert set(completion.token_ids) <= set(allowed[:3])


def best_other(top: dict, banned: set) -> int:
    """The argmax over the raw top-20 without `banned`; ties go to the lower id, as argmax's do."""
    return min((t for t in top if t not in banned), key=lambda t: (-top[t], t))


def test_bad_words_block_single_and_multi_token_words(llm):
    tok = llm.engine.tokenizer
    prompt = "Write two sentences about the sea and the ships on it."
    tokens, tops = raw_top(llm, prompt, 40)
    words = [tok.decode([t]) for t in tokens]

    # one-token word: its first appearance gives way to the best raw token that is neither form of it
    k = next(i for i, w in enumerate(words) if i > 0 and w.startswith(" ") and w[1:].isalpha() and len(w) > 3)
    word = words[k][1:]
    forms = {tuple(tok.encode(word, add_special_tokens=False)), tuple(tok.encode(" " + word, add_special_tokens=False))}
    banned = {f[0] for f in forms if len(f) == 1}
    assert tokens[k] in banned and not set(tokens[:k]) & banned
    params = SamplingParams(temperature=0, max_tokens=k + 1, ignore_eos=True, bad_words=[word])
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert got[:k] == tokens[:k] and got[k] == best_other(tops[k], banned)

    # two-token phrase " A B": B is blocked only right after A
    k = next(i for i in range(2, len(tokens)) if words[i - 1].startswith(" ") and words[i].startswith(" ")
             and words[i - 1][1:].isalpha() and words[i][1:].isalpha()
             and tok.encode(words[i - 1] + words[i], add_special_tokens=False) == tokens[i - 1:i + 1]
             and tokens[i - 1:i + 1] not in [tokens[j - 1:j + 1] for j in range(1, i)])
    phrase = (words[k - 1] + words[k]).strip()
    params = SamplingParams(temperature=0, max_tokens=k + 1, ignore_eos=True, bad_words=[phrase])
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert got[:k] == tokens[:k] and got[k] == best_other(tops[k], {tokens[k]})


@pytest.mark.parametrize("field, value", [
    ("logit_bias", {5: 101}), ("logit_bias", {5: float("nan")}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"x": 1}),
    ("logit_bias", [1, 2]), ("allowed_token_ids", []), ("allowed_token_ids", [1, -2]), ("allowed_token_ids", "1"),
    ("bad_words", "word"), ("bad_words", ["ok", ""]), ("bad_words", [3]),
])
def test_bad_constraint_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


@pytest.mark.parametrize("field, value", [("logit_bias", {10**6: 1.0}), ("allowed_token_ids", [1, 10**6])])
def test_token_ids_outside_the_vocabulary_name_the_field(llm, field, value):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(["hi"], SamplingParams(**{field: value}), use_tqdm=False)
    assert info.value.param == field
