"""StructuredOutputsParams: what shape a request's output must take (vLLM's names and keys).

A request sets exactly one of `json` (a JSON schema, as a dict or its JSON text), `regex`,
`choice` (a list of strings), `grammar` (an EBNF / GBNF grammar whose start rule is `root`) or
`json_object` (any JSON object). The engine compiles it into a grammar and masks every sampled
token to it while decoding (fuselm/engine/structured_output.py). The server maps OpenAI's
`response_format` and vLLM's `structured_outputs` / `guided_*` request fields onto these keys one
to one.

This module only checks the shape of the value (one key, the right types, JSON text that parses):
that costs nothing and needs no grammar library. Whether the schema, regex or grammar itself is
valid is checked by the engine's add_request, which parses it. Every error is an
InvalidRequestError whose param is `structured_outputs` or `structured_outputs.<key>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from fuselm.errors import InvalidRequestError, check_text

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    json: dict | str | None = None  # a JSON schema
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF / GBNF, start rule `root`
    json_object: bool | None = None  # any JSON object (OpenAI's response_format json_object)
    disable_any_whitespace: bool = False  # JSON without optional whitespace between tokens

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                f"structured_outputs needs exactly one of {', '.join(KINDS)}, got "
                f"{', '.join(given) if given else 'none'}", param="structured_outputs")
        if not isinstance(self.disable_any_whitespace, bool):
            raise _bad("disable_any_whitespace", f"must be true or false, got {self.disable_any_whitespace!r}")
        kind = given[0]
        if kind == "json":
            object.__setattr__(self, "json", _checked_schema(self.json))
        elif kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if not isinstance(value, str) or not value:
                raise _bad(kind, f"must be a non-empty string, got {value!r:.80}")
            check_text(value, f"structured_outputs.{kind}")
        elif kind == "choice":
            object.__setattr__(self, "choice", _checked_choice(self.choice))
        elif self.json_object is not True:
            raise _bad("json_object", f"must be true (or left out), got {self.json_object!r}")

    @classmethod
    def from_value(cls, value: object) -> "StructuredOutputsParams":
        """A StructuredOutputsParams as given, or one built from a dict of its keys."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidRequestError(f"structured_outputs must be a dict with one of {', '.join(KINDS)}, got "
                                      f"{type(value).__name__}", param="structured_outputs")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequestError(f"structured_outputs has unsupported keys {unknown}; the keys are "
                                      f"{sorted(known)}", param="structured_outputs")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def param(self) -> str:
        """The request field an error in this spec is reported against."""
        return f"structured_outputs.{self.kind}"

    def cache_key(self) -> tuple:
        """Equal for specs that compile to the same grammar (a schema as a dict or as text alike)."""
        kind = self.kind
        if kind == "json":
            spec: object = _canonical_json(self.json)
        elif kind == "choice":
            spec = tuple(self.choice)
        else:
            spec = getattr(self, kind)
        return kind, spec, self.disable_any_whitespace


def _bad(key: str, rule: str) -> InvalidRequestError:
    return InvalidRequestError(f"structured_outputs.{key} {rule}", param=f"structured_outputs.{key}")


def _checked_schema(schema: object) -> dict:
    if isinstance(schema, str):
        check_text(schema, "structured_outputs.json")
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise _bad("json", f"is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise _bad("json", f"must be a JSON schema object (a dict or its JSON text), got {type(schema).__name__}")
    try:
        json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _bad("json", f"is not JSON data: {exc}") from None
    return schema


def _checked_choice(choice: object) -> tuple[str, ...]:
    if not isinstance(choice, (list, tuple)) or not choice:
        raise _bad("choice", f"must be a non-empty list of strings, got {choice!r:.80}")
    for i, item in enumerate(choice):
        if not isinstance(item, str) or not item:
            raise _bad("choice", f"must hold non-empty strings, got {item!r:.80} at index {i}")
        check_text(item, "structured_outputs.choice")
    return tuple(choice)


def _canonical_json(schema: dict) -> str:
    """The schema's text with its key order kept (it orders the generated object's properties)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
