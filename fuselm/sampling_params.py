"""SamplingParams: how one request is sampled and when it stops (vLLM / OpenAI names).

Validation happens here, at construction, so a bad value becomes an InvalidRequestError (a
ValueError) whose `param` names the field before the request ever reaches the engine. The rules
are strict, as OpenAI's API is: numbers must be finite (NaN would silently empty or loop a
completion), integer fields take integers only (no bools, no strings, no floats), flags take
bools, and stop strings must be text that UTF-8 can encode (no lone surrogates). The stop strings'
matcher (fuselm.stop_strings) is built here too, so its cost lands where the request is made
rather than on the engine's step thread. Token constraints (logit_bias, allowed_token_ids,
bad_words) and structured_outputs (fuselm.structured_outputs) are checked for shape here; token
ids against the vocabulary, bad words' tokenisation and the grammar itself in the engine's
add_request, which knows the model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from fuselm.errors import InvalidRequestError, check_text
from fuselm.stop_strings import StopMatcher, stop_matcher_for
from fuselm.kv_compression import KVCompression
from fuselm.structured_outputs import StructuredOutputsParams

SEED_RANGE = (-2**63, 2**63 - 1)  # a 64-bit signed integer, as OpenAI's and vLLM's seed


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (the chosen token is always included)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | dict | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100] (OpenAI)
    allowed_token_ids: list[int] | None = None  # only these may be sampled (vLLM)
    bad_words: list[str] | None = None  # never completed in the output (vLLM)
    kv_compression: KVCompression | dict | None = None  # None: the engine's default (fuselm/kv_compression.py)
    _bad_words_token_ids: list[tuple[int, ...]] | None = field(default=None, init=False, repr=False, compare=False)
    _stop_list: list[str] = field(default_factory=list, repr=False)
    _stop_matcher: StopMatcher | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_types()

        def bad(name: str, rule: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} {rule}, got {getattr(self, name)!r}", param=name)

        if self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 or -1 disables it)")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 disables it)")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise bad("max_tokens", "must be an integer >= 0 (0 scores the prompt only: prompt_logprobs, echo)")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                                      param="min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", "must be in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise bad("prompt_logprobs", "must be in [0, 20]")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise bad("seed", f"must be a 64-bit signed integer, in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        self._stop_list = _checked_stop_strings(self.stop)
        self._stop_matcher = stop_matcher_for(tuple(self._stop_list)) if self._stop_list else None
        if self.stop_token_ids is not None:
            self.stop_token_ids = _checked_token_ids(self.stop_token_ids)
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
        if self.logit_bias is not None:
            self.logit_bias = _checked_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _checked_token_ids(self.allowed_token_ids, "allowed_token_ids")
            if not self.allowed_token_ids:
                raise InvalidRequestError("allowed_token_ids is empty; give at least one token id or leave it out",
                                          param="allowed_token_ids")
        if self.bad_words is not None:
            self.bad_words = _checked_bad_words(self.bad_words)
        self.kv_compression = KVCompression.parse(self.kv_compression)

    def _check_types(self) -> None:
        """Finite numbers for the float fields, true integers for the int fields, bools for the flags;
        numbers are normalised to plain float / int."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            setattr(self, name, _finite_float(name, getattr(self, name)))
        for name in ("n", "top_k", "min_tokens"):
            setattr(self, name, _strict_int(name, getattr(self, name)))
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _strict_int(name, value, "or None"))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise InvalidRequestError(f"{name} must be true or false (a bool), got {value!r}", param=name)

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def stop_matcher(self) -> StopMatcher | None:
        """The automaton over the stop strings (shared by every SamplingParams with the same list); None without any."""
        return self._stop_matcher

    @property
    def reads_output_tokens(self) -> bool:
        """Whether sampling looks at the tokens generated so far: a penalty, or min_tokens' EOS ban."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.min_tokens > 0 or bool(self.bad_words))

    @property
    def bad_words_token_ids(self) -> list[tuple[int, ...]] | None:
        """Each bad word's token sequences (set by the engine, which has the tokenizer)."""
        return self._bad_words_token_ids

    def clone(self, **changes: object) -> "SamplingParams":
        values = {name: getattr(self, name) for name in self.__dataclass_fields__ if not name.startswith("_")}
        values.update(changes)
        return SamplingParams(**values)


def _finite_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(f"{name} must be a number, got {value!r} ({type(value).__name__}); "
                                  f"pass an int or a float", param=name)
    number = float(value)
    if not math.isfinite(number):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}; NaN and infinities are not "
                                  f"sampling values", param=name)
    return number


def _strict_int(name: str, value: object, alternative: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        also = f" {alternative}" if alternative else ""
        raise InvalidRequestError(f"{name} must be an integer{also}, got {value!r} ({type(value).__name__}); "
                                  f"pass a whole number such as {name}=1, not a bool, string or float", param=name)
    return int(value)


def _checked_stop_strings(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, (list, tuple)):
        stops = list(stop)
    else:
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {type(stop).__name__}",
                                  param="stop")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidRequestError(f"stop must be a non-empty string or a list of non-empty strings, got {s!r} "
                                      f"({type(s).__name__}) among them", param="stop")
        check_text(s, "stop")
    return stops


def _checked_token_ids(ids: object, name: str = "stop_token_ids") -> list[int]:
    if not isinstance(ids, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0
                                                 for t in ids):
        raise InvalidRequestError(f"{name} must be a list of non-negative token ids, got {ids!r:.200}", param=name)
    return [int(t) for t in ids]


def _checked_logit_bias(bias: object) -> dict[int, float]:
    """token id (an int, or its decimal text as JSON object keys are) -> a finite bias in [-100, 100]."""
    if not isinstance(bias, dict):
        raise InvalidRequestError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}",
                                  param="logit_bias")
    checked: dict[int, float] = {}
    for key, value in bias.items():
        token = key
        if isinstance(key, str) and key.strip().isdecimal():
            token = int(key)
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise InvalidRequestError(f"logit_bias keys must be token ids (non-negative integers), got {key!r:.80}",
                                      param="logit_bias")
        number = _finite_float("logit_bias", value)
        if not -100.0 <= number <= 100.0:
            raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {value!r} for token {key}",
                                      param="logit_bias")
        checked[int(token)] = number
    return checked


def _checked_bad_words(words: object) -> list[str]:
    if not isinstance(words, (list, tuple)) or any(not isinstance(w, str) or not w.strip() for w in words):
        raise InvalidRequestError(f"bad_words must be a list of non-empty strings, got {words!r:.200}",
                                  param="bad_words")
    for word in words:
        check_text(word, "bad_words")
    return list(words)

