"""The completion and chat endpoints' logic: request -> SamplingParams -> engine streams -> OpenAI JSON.

Kept apart from app.py (routing, auth, error shapes) so the translation between the OpenAI wire
format and the engine's RequestOutputs lives in one place for both the streaming and the
non-streaming paths.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import jinja2
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from fuselm.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailed, RequestStream
from fuselm.errors import InvalidRequestError
from fuselm.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from fuselm.sampling_params import SamplingParams
from fuselm.server import constraints as C
from fuselm.server import protocol as P
from fuselm.server.tool_parsers import PARSERS, parser_for_template
from fuselm.server.clients import client_identity
from fuselm.server.limits import RequestLimiter, ServerLimits, chat_chars, max_chars_per_token

logger = logging.getLogger("fuselm")


class APIError(Exception):
    """Becomes an OpenAI-shaped error response with this status (a bad request is an InvalidRequestError)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def in_request_terms(exc: InvalidRequestError, fields: dict[str, str]) -> InvalidRequestError:
    """The same error with `param` spelled as this request spells the field: `fields` maps engine and
    SamplingParams names to the request's (a chat request's prompt is its `messages`)."""
    if exc.param not in fields:
        return exc
    return InvalidRequestError(exc.message, fields[exc.param], exc.code)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def sse(payload: BaseModel | str) -> str:
    body = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {body}\n\n"


@dataclass
class _ChoiceState:
    sent_chars: int = 0
    sent_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    done: bool = False

    def advance(self, c: CompletionOutput) -> tuple[str, list[int], list[PositionLogprobs] | None, bool]:
        """New text, token ids and logprobs since the last call. The engine's text only grows (it holds
        back what a stop string could still cut), so the new text is what follows the sent part."""
        finished = c.finish_reason is not None
        text = c.text[self.sent_chars:]
        self.sent_chars = len(c.text)
        ids = c.token_ids[self.sent_tokens:]
        lps = c.logprobs[self.sent_tokens:] if c.logprobs is not None else None
        self.sent_tokens = len(c.token_ids)
        self.done = finished
        return text, ids, lps, finished


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, served_model_name: str, limits: ServerLimits | None = None,
                 tool_call_parser: str | None = None) -> None:
        if tool_call_parser is not None and tool_call_parser not in PARSERS:
            raise ValueError(f"unknown tool call parser {tool_call_parser!r}; the parsers are {sorted(PARSERS)}")
        self.tool_call_parser = tool_call_parser or parser_for_template(engine.tokenizer.chat_template)
        self.engine = engine
        self.model_name = served_model_name
        self.defaults = engine.generation_defaults
        self.limiter = RequestLimiter(limits or ServerLimits(), engine.max_model_len,
                                      max_chars_per_token(engine.tokenizer))

    # ---- shared pieces ----------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise InvalidRequestError(f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                                      param="model", code="model_not_found")

    def sampling_params(self, req: P.SamplingRequest, fields: dict[str, str], max_tokens: int | None,
                        logprobs: int | None, prompt_logprobs: int | None = None,
                        constraint: C.Constraint | None = None) -> SamplingParams:
        """The request's SamplingParams; `fields` names the request fields that some of them come from."""
        extra = sorted(req.model_extra or ())
        refused = [name for name in extra if name in P.UNSUPPORTED_FIELDS]
        if refused:
            raise InvalidRequestError(f"{refused[0]} is not supported by this server; leave it out",
                                      param=refused[0], code="unsupported_field")
        if extra:
            logger.warning("ignoring unknown request fields: %s", ascii(extra))
        constraint = constraint or C.Constraint()

        def pick(name: str, fallback: float) -> float:
            value = getattr(req, name)
            return value if value is not None else self.defaults.get(name, fallback)

        try:
            return SamplingParams(
                n=req.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", 0),
                min_p=pick("min_p", 0.0), repetition_penalty=pick("repetition_penalty", 1.0),
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
                max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                structured_outputs=constraint.spec, logit_bias=req.logit_bias,
                allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words, kv_compression=req.kv_compression,
            )
        except InvalidRequestError as exc:
            raise in_request_terms(exc, fields) from exc

    async def submit(self, base_id: str, prompts: list[str | list[int]], params: SamplingParams, priority: int,
                     fields: dict[str, str], stream: bool, client_id: str) -> list[RequestStream]:
        """Queue every prompt at once, as `client_id`'s; if any is rejected, abort the others and raise 400.
        Without `stream` only the final outputs are handed over."""
        arrival = time.time()
        ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
        results = await asyncio.gather(
            *(self.engine.add_request(rid, p, params, priority, arrival, final_only=not stream,
                                      client_id=client_id)
              for rid, p in zip(ids, prompts)),
            return_exceptions=True)
        streams = [r for r in results if isinstance(r, RequestStream)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for s in streams:
                s.abort()
            exc = errors[0]
            if isinstance(exc, InvalidRequestError):
                raise in_request_terms(exc, fields) from exc
            if isinstance(exc, ValueError):  # rejected without naming a field (e.g. by the tokenizer)
                raise InvalidRequestError(str(exc)) from exc
            if isinstance(exc, EngineDeadError):
                raise APIError(503, str(exc), type="server_error") from exc
            raise exc
        return streams

    async def collect(self, streams: list[RequestStream], raw: Request) -> list[RequestOutput] | None:
        """Wait for every stream's final output; None (and everything aborted) if the client went away."""
        async def last(stream: RequestStream) -> RequestOutput:
            final = None
            async for out in stream:
                final = out
            return final

        work = asyncio.ensure_future(asyncio.gather(*(last(s) for s in streams)))
        watch = asyncio.ensure_future(_wait_disconnect(raw))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                # a cancelled gather ends with CancelledError as its exception: retrieve it, or asyncio
                # logs "_GatheringFuture exception was never retrieved" for every abandoned request
                work.add_done_callback(lambda f: f.cancelled() or f.exception())
            for s in streams:
                s.abort()
        if not work.done() or work.cancelled():
            return None
        try:
            return work.result()
        except RequestFailed as exc:
            raise APIError(500, str(exc), type="server_error") from exc

    async def events(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from all streams as they come."""
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    merged.put_nowait((i, out))
                merged.put_nowait((i, None))
            except Exception as exc:
                merged.put_nowait((i, exc))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                i, item = await merged.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    def stream_response(self, body: AsyncIterator[str], streams: list[RequestStream]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for piece in body:
                    yield piece
            except RequestFailed as exc:
                yield sse(P.ErrorResponse(error=P.ErrorInfo(message=str(exc), type="server_error")))
                yield sse("[DONE]")
            except Exception as exc:
                logger.exception("streaming response failed")
                yield sse(P.ErrorResponse(error=P.ErrorInfo(message=f"internal error: {exc}", type="server_error")))
                yield sse("[DONE]")
            finally:  # normal end, client disconnect (cancellation) or error: nothing keeps generating
                for s in streams:
                    s.abort()

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    def usage(outputs: list[RequestOutput]) -> P.UsageInfo:
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        gen = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return P.UsageInfo(prompt_tokens=prompt, completion_tokens=gen, total_tokens=prompt + gen)

    # ---- /v1/completions --------------------------------------------------------------------

    async def completions(self, req: P.CompletionRequest, raw: Request) -> Response | BaseModel:
        self.check_model(req.model)
        prompts = req.prompts()
        self.limiter.check_completion(req, prompts)
        prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
        constraint = C.request_constraint(req)
        fields = {"prompt_logprobs": "logprobs", **constraint.fields}
        params = self.sampling_params(req, fields, req.max_tokens, req.logprobs, prompt_lp, constraint)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.submit(request_id, prompts, params, req.priority, fields, req.stream,
                                    client_identity(raw, req.user))
        if req.stream:
            return self.stream_response(self._completion_chunks(req, request_id, streams), streams)
        finals = await self.collect(streams, raw)
        if finals is None:
            return Response(status_code=499)
        choices = []
        for pi, out in enumerate(finals):
            for c in out.outputs:
                state = _ChoiceState()
                text, ids, lps, _ = state.advance(c)
                choices.append(self._completion_choice(req, out, pi, c, state, text, ids, lps, c.finish_reason))
        return P.CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=self.usage(finals))

    def _completion_choice(self, req: P.CompletionRequest, out: RequestOutput, pi: int, c: CompletionOutput,
                           state: _ChoiceState, text: str, ids: list[int], lps, finish: str | None) -> P.CompletionChoice:
        logprobs = P.CompletionLogprobs() if req.logprobs is not None else None
        if req.echo and not state.started:
            prompt_text = out.prompt if out.prompt is not None else \
                self.engine.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
            text = prompt_text + text
            if logprobs is not None and out.prompt_logprobs is not None:
                self._add_completion_logprobs(logprobs, state, out.prompt_token_ids, out.prompt_logprobs, req.logprobs)
        state.started = True
        if logprobs is not None and lps is not None:
            self._add_completion_logprobs(logprobs, state, ids, lps, req.logprobs)
        return P.CompletionChoice(index=pi * req.n + c.index, text=text, logprobs=logprobs, finish_reason=finish,
                                  stop_reason=c.stop_reason if finish else None)

    def _add_completion_logprobs(self, into: P.CompletionLogprobs, state: _ChoiceState, ids: list[int],
                                 entries: list[PositionLogprobs | None], top_n: int) -> None:
        for tid, entry in zip(ids, entries):
            chosen = entry.get(tid) if entry else None
            token = chosen.decoded_token if chosen else self.engine.tokenizer.decode_token(tid)
            into.tokens.append(token)
            into.text_offset.append(state.text_offset)
            state.text_offset += len(token)
            if chosen is None:  # the first prompt token has no logprob
                into.token_logprobs.append(None)
                into.top_logprobs.append(None)
                continue
            into.token_logprobs.append(_finite(chosen.logprob))
            top: dict[str, float] = {}
            for e in sorted(entry.values(), key=lambda e: e.rank):  # tokens with equal text: keep the likeliest
                if e.rank <= top_n or e is chosen:
                    top.setdefault(e.decoded_token, _finite(e.logprob))
            into.top_logprobs.append(top)

    async def _completion_chunks(self, req: P.CompletionRequest, request_id: str,
                                 streams: list[RequestStream]) -> AsyncIterator[str]:
        created = int(time.time())
        states: dict[int, _ChoiceState] = {}
        finals: dict[int, RequestOutput] = {}
        async for pi, out in self.events(streams):
            finals[pi] = out
            for c in out.outputs:
                state = states.setdefault(pi * req.n + c.index, _ChoiceState())
                if state.done:
                    continue
                text, ids, lps, finished = state.advance(c)
                if not (text or finished or (lps and req.logprobs is not None) or (req.echo and not state.started)):
                    continue
                choice = self._completion_choice(req, out, pi, c, state, text, ids, lps,
                                                 c.finish_reason if finished else None)
                yield sse(P.CompletionChunk(id=request_id, created=created, model=self.model_name, choices=[choice]))
        if req.include_usage:
            yield sse(P.CompletionChunk(id=request_id, created=created, model=self.model_name, choices=[],
                                        usage=self.usage(list(finals.values()))))
        yield sse("[DONE]")

    # ---- /v1/chat/completions ---------------------------------------------------------------

    async def chat_prompt(self, messages: list[P.ChatMessage], add_generation_prompt: bool,
                          tools: list[dict] | None = None) -> list[int]:
        """The messages (and tools) rendered by the chat template and tokenised, both in the tokenizer pool.
        A template that knows nothing of tools gets them, and the calls and results, written as text."""
        conversation = [m.as_template_dict() for m in messages]
        size = chat_chars(messages)
        tokenizer = self.engine.tokenizer
        extra = {}
        if C.template_takes_tools(tokenizer.chat_template):
            if tools:
                extra["tools"] = tools
        elif tools or any(m.role == "tool" or m.tool_calls for m in messages):
            conversation = C.conversation_in_text(conversation, tools)
        try:
            text = await self.engine.in_tokenizer_pool(size, tokenizer.apply_chat_template, conversation,
                                                       add_generation_prompt, **extra)
        except (ValueError, jinja2.TemplateError) as exc:  # the template refused these messages
            raise InvalidRequestError(str(exc), param="messages") from exc
        return await self.engine.encode(text, add_special_tokens=False)

    async def chat(self, req: P.ChatCompletionRequest, raw: Request) -> Response | BaseModel:
        self.check_model(req.model)
        self.limiter.check_chat(req)
        if req.output_limit is not None and req.output_limit < 1:  # 0 only scores a prompt: completions with echo
            field = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
            raise InvalidRequestError(f"{field} must be an integer >= 1 for chat, got {req.output_limit}", param=field)
        plan = C.tool_plan(req, self.tool_call_parser)
        constraint = C.request_constraint(req, plan)
        prompt = await self.chat_prompt(req.messages, req.add_generation_prompt, plan.tools)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        fields = {"prompt": "messages", "logprobs": "top_logprobs", **constraint.fields,
                  "max_tokens": "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"}
        params = self.sampling_params(req, fields, req.output_limit, top_n, constraint=constraint)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.submit(request_id, [prompt], params, req.priority, fields, req.stream,
                                    client_identity(raw, req.user))
        if req.stream:
            return self.stream_response(self._chat_chunks(req, request_id, streams, plan), streams)
        finals = await self.collect(streams, raw)
        if finals is None:
            return Response(status_code=499)
        out = finals[0]
        choices = []
        for c in out.outputs:
            parser = plan.make_parser()
            message = P.ChatResponseMessage(content=c.text) if parser is None else C.response_message(parser.parse(c.text))
            choices.append(P.ChatChoice(
                index=c.index, message=message, stop_reason=c.stop_reason,
                logprobs=self._chat_logprobs(c.token_ids, c.logprobs, top_n) if top_n is not None else None,
                finish_reason=C.finish_reason(c.finish_reason, bool(message.tool_calls))))
        return P.ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                        usage=self.usage(finals))

    @staticmethod
    def _chat_logprobs(ids: list[int], entries: list[PositionLogprobs] | None, top_n: int) -> P.ChatLogprobs:
        content = []
        for tid, entry in zip(ids, entries or []):
            chosen = entry[tid]
            ranked = [e for e in sorted(entry.values(), key=lambda e: e.rank) if e.rank <= top_n][:top_n]
            content.append(P.TokenLogprob(
                token=chosen.decoded_token, logprob=_finite(chosen.logprob),
                bytes=list(chosen.decoded_token.encode()),
                top_logprobs=[P.TopLogprob(token=e.decoded_token, logprob=_finite(e.logprob),
                                           bytes=list(e.decoded_token.encode())) for e in ranked]))
        return P.ChatLogprobs(content=content)

    async def _chat_chunks(self, req: P.ChatCompletionRequest, request_id: str, streams: list[RequestStream],
                           plan: C.ToolPlan) -> AsyncIterator[str]:
        created = int(time.time())
        top_n = (req.top_logprobs or 0) if req.logprobs else None

        def chunk(index: int, delta: P.DeltaMessage, **fields) -> str:
            return sse(P.ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                             choices=[P.ChatStreamChoice(index=index, delta=delta, **fields)]))

        for i in range(req.n):
            yield chunk(i, P.DeltaMessage(role="assistant", content=""))
        states: dict[int, _ChoiceState] = {}
        parsers = {i: plan.make_parser() for i in range(req.n)}
        final = None
        async for _, out in self.events(streams):
            final = out
            for c in out.outputs:
                state = states.setdefault(c.index, _ChoiceState())
                if state.done:
                    continue
                text, ids, lps, finished = state.advance(c)
                parser = parsers[c.index]
                delta = P.DeltaMessage(content=text) if parser is None else C.delta_message(*parser.feed(c.text, finished))
                if delta.content or delta.tool_calls or (ids and top_n is not None):
                    lp = self._chat_logprobs(ids, lps, top_n) if top_n is not None else None
                    yield chunk(c.index, delta, logprobs=lp)
                if finished:
                    reason = C.finish_reason(c.finish_reason, bool(parser and parser.calls))
                    yield chunk(c.index, P.DeltaMessage(), finish_reason=reason, stop_reason=c.stop_reason)
        if req.include_usage and final is not None:
            yield sse(P.ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=[],
                                            usage=self.usage([final])))
        yield sse("[DONE]")


async def _wait_disconnect(raw: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return
