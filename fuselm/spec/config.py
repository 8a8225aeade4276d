"""SpeculativeConfig: the `speculative_config` engine option (vLLM's shape), validated in one place.

Accepted as a dict (`LLM(model, speculative_config={...})`) or a JSON string
(`fuselm serve --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int = 4  # k: the most tokens proposed per request per step
    prompt_lookup_min: int = 2  # ngram: shortest suffix matched
    prompt_lookup_max: int = 4  # ngram: longest suffix matched (tried first)
    model: str | None = None  # draft_model: HF directory or .gguf with the target's tokenizer
    adaptive: bool = True  # pick k each step from measured step cost and acceptance (0 = no speculation)

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict[str, Any] | str | None") -> "SpeculativeConfig | None":
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON ({exc}); e.g. "
                                 '\'{"method": "ngram", "num_speculative_tokens": 4}\'') from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a dict / JSON object, e.g. "
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown speculative_config key(s) {unknown}; known keys: {sorted(names)}")
        if "method" not in value:
            raise ValueError(f"speculative_config needs a 'method': one of {list(METHODS)}")
        return cls(**value)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {list(METHODS)}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or not 1 <= k <= 16:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {lo!r} and {hi!r}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config method 'draft_model' needs 'model': the draft model's path")
        if self.method == "ngram" and self.model:
            raise ValueError("speculative_config 'model' is only used with method 'draft_model'")
