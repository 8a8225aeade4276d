"""Tool-call parsers: text in each format -> content and calls, compared with the calls the test wrote
itself (json.loads of their arguments); fed one character at a time, the streamed deltas must add up
to the same message."""

from __future__ import annotations

import json

import pytest

from fuselm.server.tool_parsers import HermesParser, JsonArrayParser, Llama3JsonParser, NamedFunctionParser

CALLS = [("get_weather", {"city": "Paris", "nested": [1, {"brace": "}{", "tag": "</tool_call>"}]}), ("noop", {})]


def hermes_text() -> str:
    blocks = [f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>' for n, a in CALLS]
    return "Checking.\n" + "\n".join(blocks)


CASES = [
    (HermesParser, hermes_text(), "Checking.\n", CALLS),
    (JsonArrayParser, json.dumps([{"name": n, "arguments": a} for n, a in CALLS], indent=2), None, CALLS),
    (Llama3JsonParser, "<|python_tag|>" + "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in CALLS),
     None, CALLS),
    (Llama3JsonParser, "Just an answer.", "Just an answer.", []),
    (HermesParser, "No <tool_call> here, {\"name\": 1}", "No <tool_call> here, {\"name\": 1}", []),
]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_parse_and_stream(parser, text, content, calls):
    parsed = parser().parse(text)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls
    streaming, streamed_content, streamed = parser(), "", {}
    for end in range(len(text) + 1):
        piece, deltas = streaming.feed(text[:end], end == len(text))
        streamed_content += piece
        for d in deltas:
            if d.id is not None:
                streamed[d.index] = [d.name, ""]
            streamed[d.index][1] += d.arguments
    assert (streamed_content or None) == content
    assert [streamed[i] for i in sorted(streamed)] == [[c.name, c.arguments] for c in parsed.tool_calls]


def test_named_function_arguments_are_the_output():
    parser = NamedFunctionParser("f")
    assert [(c.name, json.loads(c.arguments)) for c in parser.parse(' {"x": [1, 2]}\n').tool_calls] == [("f", {"x": [1, 2]})]
