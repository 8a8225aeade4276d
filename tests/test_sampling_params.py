"""SamplingParams takes only values OpenAI's API would: finite numbers, true integers, bools, text.

The reference is the API's rules: a float field takes a finite int or float, an int field an
integer that is not a bool, a flag a bool, a stop string text UTF-8 can encode. Every refusal is
an InvalidRequestError (a ValueError) whose `param` names the field and whose message says what
to pass instead; every accepted value keeps its meaning.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fuselm import SamplingParams
from fuselm.errors import InvalidRequestError

FLOAT_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]
INT_FIELDS = ["n", "top_k", "min_tokens", "seed", "max_tokens", "logprobs", "prompt_logprobs"]
OPTIONAL_INT_FIELDS = ["seed", "max_tokens", "logprobs", "prompt_logprobs"]
FLAG_FIELDS = ["ignore_eos", "skip_special_tokens", "include_stop_str_in_output"]


def refusal(**kwargs) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    return info.value


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan")])
def test_non_finite_floats_are_refused(field, value):
    error = refusal(**{field: value})
    assert error.param == field and field in str(error) and "finite" in str(error)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [True, False, "0.5", None, [0.5]])
def test_float_fields_take_numbers_only(field, value):
    error = refusal(**{field: value})
    assert error.param == field and "number" in str(error)


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, False, "5", 5.0, 1.5, math.nan])
def test_int_fields_take_integers_only(field, value):
    error = refusal(**{field: value})
    assert error.param == field and "integer" in str(error) and "not a bool" in str(error)


@pytest.mark.parametrize("field", sorted(set(INT_FIELDS) - set(OPTIONAL_INT_FIELDS)))
def test_required_int_fields_refuse_none(field):
    assert refusal(**{field: None}).param == field


@pytest.mark.parametrize("field", FLAG_FIELDS)
@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_flags_take_bools_only(field, value):
    error = refusal(**{field: value})
    assert error.param == field and "bool" in str(error)


@pytest.mark.parametrize("stop", [[1], ["ok", None], ["ok", b"bytes"], 5, {"a": 1}, ["ok", ""]])
def test_stop_must_be_non_empty_strings(stop):
    assert refusal(stop=stop).param == "stop"


@pytest.mark.parametrize("stop", ["\ud800", ["ok", "a\udfffb"], "x\udc00"])
def test_stop_strings_with_lone_surrogates_are_refused(stop):
    error = refusal(stop=stop)
    assert error.param == "stop" and "surrogate" in str(error)


@pytest.mark.parametrize("ids", [[True], ["3"], [1.0], 5, "12"])
def test_stop_token_ids_are_integers(ids):
    assert refusal(stop_token_ids=ids).param == "stop_token_ids"


def test_seed_is_a_64_bit_integer():
    for seed in (-2**63, 0, 2**63 - 1):
        assert SamplingParams(seed=seed).seed == seed
    for seed in (2**63, -2**63 - 1, 10**30):
        assert refusal(seed=seed).param == "seed"


def test_valid_values_keep_their_meaning():
    """Ints for float fields, numpy scalars and tuples are what they say; nothing else changes."""
    params = SamplingParams(temperature=0, top_p=np.float64(0.5), top_k=np.int64(3), n=np.int32(2), max_tokens=7,
                            seed=np.int64(-4), stop=("a", "\U0001f600"), stop_token_ids=(np.int64(2), 5))
    assert (params.temperature, params.top_p, params.top_k, params.n, params.max_tokens, params.seed) == \
        (0.0, 0.5, 3, 2, 7, -4)
    assert type(params.temperature) is float and type(params.top_k) is int and type(params.seed) is int
    assert params.stop_strings == ["a", "\U0001f600"] and params.stop_token_ids == [2, 5]
    assert SamplingParams(top_k=-1).top_k == 0  # -1 still means off
    assert SamplingParams(max_tokens=None, logprobs=None, seed=None).max_tokens is None
    assert params.clone(temperature=0.7) == SamplingParams(**{**_public_fields(params), "temperature": 0.7})


def _public_fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__dataclass_fields__ if not name.startswith("_")}
