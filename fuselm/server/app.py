"""The FastAPI application: routes, API-key check, body size limit and OpenAI-shaped errors around one
AsyncLLMEngine.

build_app() wires an already-loaded AsyncLLMEngine into a fresh app with its own Prometheus
registry, so several apps (e.g. in tests) can live in one process.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fuselm.engine.async_engine import AsyncLLMEngine
from fuselm.errors import InvalidRequestError
from fuselm.server import protocol as P
from fuselm.server.clients import API_KEY_INDEX
from fuselm.server.limits import BodySizeLimitMiddleware, ServerLimits
from fuselm.server.metrics import ServerMetrics
from fuselm.server.serving import APIError, OpenAIServing

logger = logging.getLogger("fuselm")


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


async def reject_too_large(scope, receive, send, message: str) -> None:
    await error_response(413, message, code="request_too_large")(scope, receive, send)


def short_model_name(source: str) -> str:
    """A model's display name from where it was loaded: the file or directory name, never the host path."""
    parts = [part for part in re.split(r"[/\\]", source) if part]
    return parts[-1].removesuffix(".gguf") if parts else "model"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param


class APIKeyMiddleware:
    """Pure ASGI (streaming-safe) check of 'Authorization: Bearer KEY' on the OpenAI routes and the API
    docs (and a prefill instance's /kv/ routes), before anything else looks at the request; /health and
    /metrics stay open. With several keys
    (one per client), the index of the key that matched identifies the client (server/clients.py)."""

    PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info", "/docs", "/redoc", "/openapi.json", "/kv/")

    def __init__(self, app, api_key: str | list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in ([api_key] if isinstance(api_key, str) else api_key)]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.PROTECTED):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            token = token.strip()
            matches = [hmac.compare_digest(token, key) for key in self.keys]  # every key, in constant time each
            if scheme.lower() != b"bearer" or not any(matches):
                response = error_response(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                                          type="authentication_error", code="invalid_api_key")
                await response(scope, receive, send)
                return
            if len(self.keys) > 1:
                scope[API_KEY_INDEX] = matches.index(True)
        await self.app(scope, receive, send)


def build_app(engine: AsyncLLMEngine, served_model_name: str | None = None, api_key: str | list[str] | None = None,
              limits: ServerLimits | None = None, enable_docs: bool = True,
              tool_call_parser: str | None = None) -> FastAPI:
    """`served_model_name` defaults to the model's file or directory name; `enable_docs=False` turns off
    /docs, /redoc and /openapi.json (with `api_key` they need the key); `tool_call_parser` (a name in
    tool_parsers.PARSERS) defaults to the one the chat template's tool format calls for."""
    limits = limits or ServerLimits()
    name = served_model_name or short_model_name(engine.model_name)
    serving = OpenAIServing(engine, name, limits, tool_call_parser)
    metrics = ServerMetrics(name)
    if metrics not in engine.observers:
        engine.observers.append(metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        with contextlib.suppress(ValueError):
            engine.observers.remove(metrics)

    docs = {} if enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="fuselm", summary="OpenAI-compatible LLM server", lifespan=lifespan, **docs)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.served_model_name = name
    app.state.limits = limits

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=limits.max_request_body_bytes, reject=reject_too_large)
    if api_key:  # added last, so it runs first: no body is read for a request without the key
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    # ---- errors -------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(InvalidRequestError)
    async def _invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(400, exc.message, param=exc.param, code=exc.code)  # the attributes, never the text

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path} not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message, code=None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error")

    # ---- open routes --------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return Response(status_code=200)
        return error_response(503, "the engine thread is not running", type="server_error")

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.render(engine.snapshot, getattr(engine.engine.runner, "expert_stats", None)),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/expert_stats")
    async def expert_stats() -> Response:
        """An MoE model's routing statistics as JSON (the file `fuselm placement --stats` reads)."""
        stats = getattr(engine.engine.runner, "expert_stats", None)  # an MoE model's routing counts
        if stats is None:
            return error_response(404, f"{name} has no experts: there are no routing statistics", code=None)
        return JSONResponse(stats.to_json(engine.engine.model_name))

    # ---- OpenAI routes (behind the API key) -------------------------------------------------------

    api = APIRouter()

    @api.get("/v1/models", response_model=P.ModelList)
    async def models() -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=name, root=name, max_model_len=engine.max_model_len)])

    @api.get("/v1/models/{model_id:path}", response_model=P.ModelCard)
    async def model(model_id: str) -> P.ModelCard:
        if model_id != name:
            return error_response(404, f"the model {model_id!r} does not exist; this server serves {name!r}",
                                  param="model", code="model_not_found")
        return P.ModelCard(id=name, root=name, max_model_len=engine.max_model_len)

    @api.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        """vLLM's tokenizer description (lm-eval reads it instead of downloading the tokenizer)."""
        tok = engine.tokenizer
        special = {"bos_token": tok.bos_token_id, "eos_token": tok.eos_token_id, "pad_token": tok.pad_token_id}
        info = {key: tok.token_to_str(tid) for key, tid in special.items() if tid is not None}
        return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": engine.max_model_len,
                "vocab_size": tok.vocab_size, "chat_template": tok.chat_template, **info}

    @api.post("/v1/completions", response_model=None)
    async def completions(body: P.CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    @api.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest) -> dict:
        serving.check_model(body.model)
        # Only counting, never generating: bounded by the request body size, not by max_model_len (a
        # benchmark client tokenises its whole corpus here), and tokenised in the pool like any prompt.
        if body.messages is not None:
            ids = await serving.chat_prompt(body.messages, body.add_generation_prompt)
        else:
            ids = await engine.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @api.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest) -> dict:
        serving.check_model(body.model)
        vocab = engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": await engine.decode(body.tokens, skip_special_tokens=False)}

    app.include_router(api)
    return app
