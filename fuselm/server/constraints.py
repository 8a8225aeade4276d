"""A request's output constraints: its structured-output fields and its tools, in engine terms.

OpenAI's `response_format`, vLLM's `structured_outputs` extra body and its older `guided_*` fields
all become one StructuredOutputsParams (a request may use only one of them); an error in the spec
is reported against the field the request used (`response_format.json_schema.schema`,
`guided_regex`, ...). Tools become a ToolPlan: the tool list for the chat template, the parser
that reads calls out of the output and, for `tool_choice: "required"` or a named function, the
JSON schema that forces the output to be calls whose arguments match the functions' parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fuselm.errors import InvalidRequestError
from fuselm.server import protocol as P
from fuselm.server import tool_parsers as T
from fuselm.structured_outputs import KINDS

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


@dataclass
class Constraint:
    """The structured-output spec for SamplingParams and how its error params read in request terms."""

    spec: dict[str, Any] | None = None
    fields: dict[str, str] = field(default_factory=dict)


def _reported_as(field_name: str) -> dict[str, str]:
    """Every param a spec error can carry, spelled as the request field it came from."""
    return {f"structured_outputs{suffix}": field_name
            for suffix in ("", ".disable_any_whitespace", *(f".{kind}" for kind in KINDS))}


def structured_outputs(req: P.SamplingRequest) -> Constraint:
    sources: list[tuple[str, dict[str, Any], dict[str, str]]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        sources.append(("response_format", {"json_object": True}, _reported_as("response_format")))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise InvalidRequestError("response_format of type json_schema needs json_schema.schema",
                                      param="response_format.json_schema")
        sources.append(("response_format", {"json": fmt.json_schema.json_schema},
                        _reported_as("response_format.json_schema.schema")))
    if req.structured_outputs is not None:
        sources.append(("structured_outputs", dict(req.structured_outputs), {}))  # its params are its own
    for name, key in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            sources.append((name, {key: value}, _reported_as(name)))
    if not sources:
        return Constraint()
    if len(sources) > 1:
        raise InvalidRequestError(f"give at most one of response_format, structured_outputs and the guided_* fields; "
                                  f"this request has {', '.join(s[0] for s in sources)}", param=sources[1][0])
    _, spec, names = sources[0]
    return Constraint(spec, names)


@dataclass
class ToolPlan:
    """What a chat request's tools change: the template's `tools`, the output parser, a forcing schema."""

    tools: list[dict[str, Any]] | None = None
    parser: str | None = None  # a tool_parsers.PARSERS name, "json_array" or "named"
    function: str | None = None  # the function a named tool_choice forces
    forced: Constraint = field(default_factory=Constraint)

    def make_parser(self) -> T.ToolCallParser | T.NamedFunctionParser | None:
        if self.parser == "named":
            return T.NamedFunctionParser(self.function)
        if self.parser == "json_array":
            return T.JsonArrayParser()
        return T.PARSERS[self.parser]() if self.parser else None


def _parameters_schema(function: P.FunctionDefinition) -> dict[str, Any]:
    params = function.parameters
    return params if params else {"type": "object", "properties": {}}


def tool_plan(req: P.ChatCompletionRequest, default_parser: str) -> ToolPlan:
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools; give the functions in tools", param="tool_choice")
        return ToolPlan()
    names = [t.function.name for t in req.tools]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InvalidRequestError(f"tools has functions with the same name: {duplicated}", param="tools")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice == "none":
        return ToolPlan(tools=tools)
    fields = _reported_as("tools")
    if isinstance(choice, P.NamedToolChoice):
        function = next((t.function for t in req.tools if t.function.name == choice.function.name), None)
        if function is None:
            raise InvalidRequestError(f"tool_choice names the function {choice.function.name!r}, which is not in "
                                      f"tools ({', '.join(names)})", param="tool_choice")
        return ToolPlan(tools, "named", function.name, Constraint({"json": _parameters_schema(function)}, fields))
    if choice == "required":
        call_schemas = [{"type": "object", "properties": {"name": {"enum": [t.function.name]},
                                                           "arguments": _parameters_schema(t.function)},
                         "required": ["name", "arguments"], "additionalProperties": False} for t in req.tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}}
        if not req.parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolPlan(tools, "json_array", forced=Constraint({"json": schema}, fields))
    return ToolPlan(tools, default_parser)


def request_constraint(req: P.SamplingRequest, plan: ToolPlan | None = None) -> Constraint:
    """The one structured-output spec of a request (its own fields or a forced tool call)."""
    own = structured_outputs(req)
    if plan is None or plan.forced.spec is None:
        return own
    if own.spec is not None:
        raise InvalidRequestError("tool_choice 'required' or a named function already fixes the output's shape; "
                                  "leave out response_format, structured_outputs and guided_*", param="tool_choice")
    return plan.forced


# ---- templates that know nothing of tools ---------------------------------------------------------

_TOOLS_PREAMBLE = (
    "# Tools\n\nYou can call functions to help answer. Their signatures, one JSON object per line:\n<tools>\n{tools}\n"
    "</tools>\n\nTo call a function, answer with one block per call, each holding a JSON object with the "
    "function's name and its arguments:\n<tool_call>\n{{\"name\": <function name>, \"arguments\": "
    "<arguments as a JSON object>}}\n</tool_call>")


def template_takes_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def conversation_in_text(conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict]:
    """For a chat template that ignores tools: the tools described in the system message and the calls and
    tool results written out in the Hermes format the hermes parser reads."""
    out = []
    for message in conversation:
        message = dict(message)
        if message.get("tool_calls"):
            blocks = [f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n</tool_call>"
                      for c in message.pop("tool_calls")]
            message["content"] = "\n".join(([message["content"]] if message.get("content") else []) + blocks)
        if message["role"] == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        out.append(message)
    if tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        preamble = _TOOLS_PREAMBLE.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


# ---- the response side --------------------------------------------------------------------------

def response_message(parsed: T.Parsed) -> P.ChatResponseMessage:
    calls = [P.ToolCallOut(id=c.id, function=P.FunctionCall(name=c.name, arguments=c.arguments))
             for c in parsed.tool_calls]
    return P.ChatResponseMessage(content=parsed.content, tool_calls=calls)


def delta_message(content: str, deltas: list[T.ToolCallDelta]) -> P.DeltaMessage:
    calls = [P.ToolCallDeltaOut(index=d.index, id=d.id, type="function" if d.id else None,
                                function=P.FunctionCallDelta(name=d.name, arguments=d.arguments))
             for d in deltas]
    return P.DeltaMessage(content=content or None, tool_calls=calls or None)


def finish_reason(reason: str | None, made_calls: bool) -> str | None:
    """OpenAI's `tool_calls` for a choice that ended by calling tools."""
    return "tool_calls" if made_calls and reason == "stop" else reason
