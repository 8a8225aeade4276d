"""Tool-call parsers: a model's generated text -> content plus OpenAI `tool_calls`, as it streams.

Every parser reads text that grows (the engine's text for one choice) and hands back what is new
since the last call: content text and tool-call deltas in OpenAI's streaming shape (a call's id and
name first, then fragments of its arguments). The non-streaming answer is the same parser fed the
final text once, so a stream's deltas always reassemble to the non-streamed message.

A call is the JSON object `{"name": ..., "arguments": {...}}` ("parameters" is accepted for
"arguments", as Llama 3 writes it). Arguments are passed on as the model wrote them (the raw JSON
text of the value), which is what makes streaming them exact. Formats:

- hermes: Hermes / Qwen2.5 / SmolLM-style `<tool_call>{...}</tool_call>` blocks after optional text.
- llama3_json: Llama 3.1's JSON tool calls: the output is one call object (after an optional
  `<|python_tag|>`), or several separated by `;`.
- json_array: `[{...}, {...}]`, what `tool_choice: "required"` forces the model to write.
- named: the whole output is the arguments of one function known in advance (a named tool_choice).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:')
_DECODER = json.JSONDecoder()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    """One streamed piece of a call: `id` and `name` only in its first piece."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class Parsed:
    """A whole message: its content (None when empty) and its calls."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ToolCallParser:
    """Calls wrapped between `open_tag` and `close_tag` (for a format without tags, the call object's own
    braces), with content text around them when `content` is true."""

    open_tag = "<tool_call>"
    close_tag = "</tool_call>"
    consume_open = True  # the open tag is not part of the call object
    content = True

    def __init__(self) -> None:
        self.pos = 0  # text before this position has been handled
        self.state = "text"
        self.calls: list[ToolCall] = []
        self.call_start = 0  # where the current call's open tag began
        self.args_start = 0  # where the current call's arguments value begins
        self.args_sent = 0  # arguments text up to here has been handed out

    def feed(self, text: str, finished: bool) -> tuple[str, list[ToolCallDelta]]:
        """New content and call deltas from the whole text so far."""
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            before = (self.state, self.pos, self.args_sent)
            getattr(self, f"_{self.state}")(text, finished, content, deltas)
            if (self.state, self.pos, self.args_sent) == before:
                break
        return "".join(content), deltas

    def parse(self, text: str) -> Parsed:
        content, _ = self.feed(text, finished=True)
        return Parsed(content or None, self.calls)

    # ---- states: each handles text from self.pos and may move on ----------------------------------

    def _text(self, text: str, finished: bool, content: list[str], deltas: list[ToolCallDelta]) -> None:
        found = text.find(self.open_tag, self.pos)
        if found < 0:
            end = len(text) if finished else len(text) - _held_prefix(text[self.pos:], self.open_tag)
            self._content(text[self.pos:end], content)
            self.pos = max(self.pos, end)
            return
        self._content(text[self.pos:found], content)
        self.call_start = found
        self.pos = found + len(self.open_tag) if self.consume_open else found
        self.state = "head"

    def _content(self, piece: str, content: list[str]) -> None:
        if self.content and piece and not (self.calls and not piece.strip()):  # drop blank text between calls
            content.append(piece)

    def _head(self, text: str, finished: bool, content: list[str], deltas: list[ToolCallDelta]) -> None:
        start = self.pos
        while start < len(text) and text[start].isspace():
            start += 1
        match = _CALL_HEAD.match(text, start)
        if match is None:
            if finished:  # not a call after all: its text is content
                self._content(text[self.call_start:], content)
                self.pos, self.state = len(text), "text"
            return
        name = json.loads(f'"{match.group(1)}"')
        call = ToolCall(new_call_id(), name)
        self.calls.append(call)
        deltas.append(ToolCallDelta(len(self.calls) - 1, "", call.id, name))
        self.args_start = self.args_sent = self.pos = match.end()
        self.state = "args"

    def _args(self, text: str, finished: bool, content: list[str], deltas: list[ToolCallDelta]) -> None:
        if self.args_sent == self.args_start:  # skip the blanks before the value
            while self.args_start < len(text) and text[self.args_start].isspace():
                self.args_start += 1
            self.args_sent = self.args_start
            if self.args_start == len(text):
                return
        try:
            _, end = _DECODER.raw_decode(text, self.args_start)
        except json.JSONDecodeError:
            end = None  # the value is still being written: all of it so far is arguments
        stop = len(text) if end is None else end
        if stop > self.args_sent:
            piece = text[self.args_sent:stop]
            self.calls[-1].arguments += piece
            deltas.append(ToolCallDelta(len(self.calls) - 1, piece))
            self.args_sent = stop
        if end is not None:
            self.pos, self.state = end, "tail"

    def _tail(self, text: str, finished: bool, content: list[str], deltas: list[ToolCallDelta]) -> None:
        brace = text.find("}", self.pos)  # the call object's own closing brace
        if brace < 0:
            return
        found = text.find(self.close_tag, brace)
        if found >= 0 or self.close_tag == "}":
            self.pos = brace + 1 if self.close_tag == "}" else found + len(self.close_tag)
            self.state = "text"


class HermesParser(ToolCallParser):
    """`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks (Hermes, Qwen2.5)."""


class JsonArrayParser(ToolCallParser):
    """`[{"name": ..., "arguments": ...}, ...]`: the calls `tool_choice: "required"` forces."""

    open_tag = "{"
    close_tag = "}"
    consume_open = False
    content = False


class Llama3JsonParser(ToolCallParser):
    """Llama 3.1 JSON calls: `{"name": ..., "parameters": ...}` (several joined by `;`), the output's
    only text, after an optional `<|python_tag|>`. Output that does not start with `{` is content."""

    open_tag = "{"
    close_tag = "}"
    consume_open = False

    def _text(self, text: str, finished: bool, content: list[str], deltas: list[ToolCallDelta]) -> None:
        if self.calls:
            super()._text(text, finished, content, deltas)
            return
        body = text.removeprefix("<|python_tag|>").lstrip()
        if not finished and "<|python_tag|>".startswith(text.lstrip()):
            return  # nothing to judge the output by yet
        if body.startswith("{"):
            super()._text(text, finished, content, deltas)
            return
        self.content_only = True
        self._content(text[self.pos:], content)
        self.pos = len(text)

    content_only = False  # the output turned out to be plain text

    def _content(self, piece: str, content: list[str]) -> None:
        if not self.content_only:  # between calls: only the tag and the separators
            piece = piece.replace("<|python_tag|>", "").strip(" \n;")
        super()._content(piece, content)


class NamedFunctionParser:
    """The whole output is the arguments of `name` (a named tool_choice forces exactly that)."""

    def __init__(self, name: str) -> None:
        self.call = ToolCall(new_call_id(), name)
        self.calls = [self.call]
        self.started = False
        self.sent = 0

    def feed(self, text: str, finished: bool) -> tuple[str, list[ToolCallDelta]]:
        deltas = []
        if not self.started:
            self.started = True
            deltas.append(ToolCallDelta(0, "", self.call.id, self.call.name))
        start = len(text) - len(text.lstrip())
        end = len(text.rstrip())  # trailing blanks wait: they may be inside the value
        self.sent = max(self.sent, start)
        if end > self.sent:
            piece = text[self.sent:end]
            self.call.arguments += piece
            deltas.append(ToolCallDelta(0, piece))
            self.sent = end
        return "", deltas

    def parse(self, text: str) -> Parsed:
        self.feed(text, finished=True)
        return Parsed(None, self.calls)


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


def parser_for_template(template: str | None) -> str:
    """The parser a chat template's tool format calls for (hermes unless it is Llama 3's)."""
    if template and "<tool_call>" not in template and ("<|python_tag|>" in template or "ipython" in template):
        return "llama3_json"
    return "hermes"
