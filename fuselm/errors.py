"""Errors that name what the caller got wrong, so no one has to read it out of a message.

InvalidRequestError is raised by request validation (SamplingParams, the engine's add_request,
the server's own checks) with `param`, the request field at fault, and `code`, an OpenAI-style
error code when one applies. The server builds the OpenAI error body from these attributes.
InvalidConfigError is raised for a bad engine option and names the option. Both are ValueErrors,
so callers that catch ValueError keep working. check_text rejects text with a lone surrogate, the
one kind of Python string that is not Unicode text, before it reaches the tokenizer.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine will not run: `param` is the field at fault (None when no single field is)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code  # e.g. "context_length_exceeded"

    def __reduce__(self):  # keep param and code when pickled (args holds the message only)
        return type(self), (self.message, self.param, self.code)


class InvalidConfigError(ValueError):
    """An engine option with a value the engine cannot use: `option` is its EngineConfig name."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.option = option

    def __reduce__(self):
        return type(self), (self.message, self.option)


def check_text(text: str, param: str, where: str | None = None) -> None:
    """Raise InvalidRequestError for `param` when the text holds a lone surrogate (an unpaired
    U+D800..U+DFFF code point, which JSON's \\ud800 escapes and Python strings allow): it is not
    text, UTF-8 cannot encode it, and the tokenizer would fail on it with an unclear TypeError.
    `where` names the spot inside the field for the message (e.g. messages[2]['content'])."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{where or param} contains a lone surrogate {ascii(text[exc.start])} at character {exc.start}, which "
            f"is not valid Unicode text; remove it or pair it into a whole character", param=param) from None
