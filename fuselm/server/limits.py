"""The server's limits on what one request may ask for, checked before any expensive work.

Every limit here bounds the work one request can cause before it is refused: the body's size
(checked from Content-Length and while the body streams in, before JSON parsing), the characters
of its prompts (before tokenising: a text longer than max_model_len tokens of the longest
vocabulary entry cannot fit), the sequences it fans out to (prompts x n), its stop strings,
logprobs and priority. A refusal is an OpenAI-shaped 4xx naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuselm.errors import InvalidRequestError
from fuselm.server import protocol as P

PRIORITY_RANGE = (-1000, 1000)  # the priorities a request may ask for when priorities are enabled


@dataclass(frozen=True)
class ServerLimits:
    max_request_body_bytes: int = 4 * 1024 * 1024
    max_sequences_per_request: int = 128  # prompts x n
    max_stop_strings: int = 32
    max_stop_string_chars: int = 256
    max_logprobs: int = 20  # completions' logprobs and chat's top_logprobs
    allow_request_priority: bool = False

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "max_sequences_per_request", "max_stop_strings",
                     "max_stop_string_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError(f"max_logprobs must be in [0, 20], got {self.max_logprobs}")


def max_chars_per_token(tokenizer) -> int:
    """The most characters one token can stand for: the longest vocabulary entry (byte-level BPE writes
    one character per byte, SentencePiece one per character, byte fallback six per byte), at least 1."""
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    return max(1, max((len(piece) for piece in vocab), default=1))


class RequestLimiter:
    """Checks a parsed request against the limits; raises InvalidRequestError naming the field."""

    def __init__(self, limits: ServerLimits, max_model_len: int, chars_per_token: int) -> None:
        self.limits = limits
        self.max_model_len = max_model_len
        self.max_prompt_chars = max_model_len * chars_per_token

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"{param} has {num_chars} characters, more than max_model_len ({self.max_model_len}) tokens can hold "
                f"(at most {self.max_prompt_chars} characters); shorten it", param=param,
                code="context_length_exceeded")

    def check_sampling(self, req: P.SamplingRequest, num_prompts: int) -> None:
        limits = self.limits
        if num_prompts * req.n > limits.max_sequences_per_request:
            param = "n" if req.n > 1 else "prompt"
            raise InvalidRequestError(
                f"{num_prompts} prompt(s) x n={req.n} asks for {num_prompts * req.n} sequences; this server allows "
                f"at most {limits.max_sequences_per_request} per request", param=param)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > limits.max_stop_strings:
            raise InvalidRequestError(f"stop has {len(stops)} strings; this server allows at most "
                                      f"{limits.max_stop_strings}", param="stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > limits.max_stop_string_chars:
            raise InvalidRequestError(f"a stop string has {longest} characters; this server allows at most "
                                      f"{limits.max_stop_string_chars}", param="stop")
        self.check_priority(req.priority)

    def check_priority(self, priority: int) -> None:
        if priority == 0:
            return
        if not self.limits.allow_request_priority:
            raise InvalidRequestError("this server does not accept per-request priorities (start it with "
                                      "--allow-request-priority); leave priority out or 0", param="priority")
        low, high = PRIORITY_RANGE
        if not low <= priority <= high:
            raise InvalidRequestError(f"priority must be in [{low}, {high}], got {priority}", param="priority")

    def check_logprobs(self, value: int | None, param: str) -> None:
        if value is not None and value > self.limits.max_logprobs:
            raise InvalidRequestError(f"{param} must be at most {self.limits.max_logprobs} on this server, got "
                                      f"{value}", param=param)

    def check_completion(self, req: P.CompletionRequest, prompts: list[str | list[int]]) -> None:
        self.check_sampling(req, len(prompts))
        self.check_logprobs(req.logprobs, "logprobs")
        for p in prompts:
            if isinstance(p, str):
                self.check_prompt_chars(len(p), "prompt")

    def check_chat(self, req: P.ChatCompletionRequest) -> None:
        self.check_sampling(req, 1)
        self.check_logprobs(req.top_logprobs, "top_logprobs")
        self.check_prompt_chars(chat_chars(req.messages), "messages")


def chat_chars(messages: list[P.ChatMessage]) -> int:
    """Characters of the messages' text: their rendered prompt is at least this long."""
    total = 0
    for m in messages:
        content = m.content
        if isinstance(content, list):
            total += sum(len(part.text or "") for part in content)
        elif content:
            total += len(content)
        total += len(m.name or "")
    return total


class BodySizeLimitMiddleware:
    """Pure ASGI: refuses (413) a request body over `max_bytes`, from Content-Length when the client sends
    one and while the body streams in, before anything parses it. The body read here is handed on whole."""

    def __init__(self, app, max_bytes: int, reject) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.reject = reject  # async (scope, receive, send, message) -> None, sends the 413

    def _too_large(self, size: int | str) -> str:
        return (f"the request body ({size} bytes) is larger than this server's limit of {self.max_bytes} bytes "
                "(--max-request-body-bytes)")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.reject(scope, receive, send, self._too_large(int(declared)))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self.reject(scope, receive, send, self._too_large(f"over {self.max_bytes}"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
