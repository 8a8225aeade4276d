"""KV cache compression settings of a request: which positions of its context its KV cache keeps.

`kv_compression` is an engine default (EngineConfig) and a per-request override (SamplingParams,
the server's extra body), a dict checked here so that a bad value is an InvalidRequestError naming
the key (HTTP 400) before anything is queued:

- `{"method": "streaming", "sink": 4, "window": 1024}` (StreamingLLM): the first `sink` positions
  (the attention sinks, rounded up to whole KV blocks) and the most recent `window` positions (at
  least; eviction drops whole blocks, so up to window + block_size - 1 are held). Blocks that fall
  out of the window go back to the pool as the sequence grows, prompt and output alike.
  `"positions": "text"` (default): keys and queries keep their position in the text;
  `"positions": "cache"` (as the paper): they take their index in the cache, and the window's keys
  are re-rotated when blocks before them leave (runner/cache_positions.py), so the distance to the
  sinks stays within sinks + window however long the stream runs.
- `{"method": "snapkv", "budget": 1024, "window": 32, "pool": 15}` (SnapKV): at the end of the
  prompt's prefill every prompt position is scored, per layer and KV head, by the attention the
  last `window` prompt queries give it (summed over those queries and the KV head's query heads,
  max-pooled over `pool` neighbouring positions); the last `window` positions and the best
  `budget - window` others are kept, compacted into the request's first blocks, and the rest of
  its blocks are freed. Generated tokens are appended uncompressed. The pool is wider than the
  paper's 7 because the window's queries point at the start of an answer (the first digits of a
  number) while decoding reads on through it: 15 keeps seven tokens on each side of an attended
  one (docs/kv_compression.md, "Quality and speed").
- `{"method": "h2o", "budget": 1024, "recent": 128}` (H2O, heavy hitters): every position is
  scored, per layer and KV head, by the attention it has received so far (summed over the KV head's
  query heads, over every prompt query and every decode step's query); once the request's cache
  holds budget + recent + one block of entries, it keeps the best-scored `budget` of those before
  the last `recent` and those `recent`, compacted, and frees the rest (layers/h2o_scores.py,
  runner/h2o_compaction.py).
- `{"method": "none"}`: keep everything (overrides an engine default).

A prompt no longer than the budget (streaming: sink blocks + window) is never compressed, so its
output is the uncompressed output. Compressed blocks are private to their request: such a request
neither takes prefix-cache hits nor registers its blocks (core/kv_eviction.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fuselm.errors import InvalidRequestError

METHODS = ("none", "streaming", "snapkv", "h2o")
_KEYS = {"none": {"method"}, "streaming": {"method", "sink", "window", "positions"},
         "snapkv": {"method", "budget", "window", "pool"}, "h2o": {"method", "budget", "recent"}}


@dataclass(frozen=True, slots=True)
class KVCompression:
    method: str  # "streaming", "snapkv", "h2o" or "none" (no compression, overriding an engine default)
    budget: int = 0  # snapkv: positions kept per layer and KV head; h2o: heavy hitters kept besides the recent ones
    window: int = 0  # streaming: recent positions kept; snapkv: observation window (last prompt queries)
    sink: int = 0  # streaming: first positions always kept
    pool: int = 15  # snapkv: max-pool width over neighbouring positions' scores (odd)
    recent: int = 0  # h2o: the last positions always kept
    positions: str = "text"  # streaming: rotary positions in the "text" or in the "cache" (the paper's)

    @classmethod
    def parse(cls, value: Any, param: str = "kv_compression") -> "KVCompression | None":
        """A dict (or KVCompression, or None) -> KVCompression; None stays None (not set)."""
        if value is None or isinstance(value, KVCompression):
            return value
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{param} must be an object such as {{\"method\": \"snapkv\", \"budget\": 1024}}, "
                                      f"got {value!r}", param=param)
        method = value.get("method")
        if method not in METHODS:
            raise InvalidRequestError(f"{param}.method must be one of {', '.join(METHODS)}, got {method!r}",
                                      param=f"{param}.method")
        unknown = sorted(set(value) - _KEYS[method])
        if unknown:
            raise InvalidRequestError(f"{param} has key(s) {unknown} that method {method!r} does not take "
                                      f"(it takes {sorted(_KEYS[method])})", param=f"{param}.{unknown[0]}")

        def integer(key: str, default: int | None, minimum: int) -> int:
            number = value.get(key, default)
            if number is None:
                raise InvalidRequestError(f"{param}.{key} is required for method {method!r}", param=f"{param}.{key}")
            if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
                raise InvalidRequestError(f"{param}.{key} must be an integer >= {minimum}, got {number!r}",
                                          param=f"{param}.{key}")
            return number

        if method == "none":
            return cls("none")
        if method == "streaming":
            positions = value.get("positions", "text")
            if positions not in ("text", "cache"):
                raise InvalidRequestError(f"{param}.positions must be \"text\" or \"cache\", got {positions!r}",
                                          param=f"{param}.positions")
            return cls("streaming", window=integer("window", None, 1), sink=integer("sink", 4, 0), positions=positions)
        if method == "h2o":
            return cls("h2o", budget=integer("budget", None, 1), recent=integer("recent", None, 1))
        window = integer("window", 32, 1)
        budget = integer("budget", None, 1)
        pool = integer("pool", 15, 1)
        if budget < window:
            raise InvalidRequestError(f"{param}.budget ({budget}) must be at least its window ({window}): the window's "
                                      "own positions are always kept", param=f"{param}.budget")
        if pool % 2 == 0:
            raise InvalidRequestError(f"{param}.pool must be odd (centred on each position), got {pool}",
                                      param=f"{param}.pool")
        return cls("snapkv", budget=budget, window=window, pool=pool)
