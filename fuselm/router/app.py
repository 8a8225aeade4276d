"""`fuselm router`'s FastAPI application: one OpenAI-compatible front end over many fuselm instances.

Replica mode (--worker URL ...): each completion or chat request goes to one replica chosen by the
routing policy (router/policies.py) and is passed through unchanged: the body as sent, the answer
as the replica wrote it, streams chunk by chunk, errors with the replica's status and body.
Disaggregated mode (--prefill URL ... --decode URL ...): the request goes to a decode instance
together with the prefill instance that is to compute its prompt (the `x-fuselm-prefill-url`
header; fuselm/disagg/ does the rest), each picked least-loaded.

An instance that stops answering fails its in-flight requests at once with a 502 naming it (a
stream gets an OpenAI-shaped error event), never a hang: the health checker (router/health.py)
sets the instance's `down` event and every proxy wait also watches that event. A request whose
instance refuses the connection before anything was sent is retried on another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fuselm.router.health import HealthChecker
from fuselm.router.metrics import RouterMetrics
from fuselm.router.policies import Replica, Router

PREFILL_HEADER = "x-fuselm-prefill-url"  # decode instances read it: where the prompt's KV is computed
_PASSED_HEADERS = ("authorization", "content-type")


class InstanceDown(Exception):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"instance {url} {reason}")
        self.url = url


def error_body(message: str, type: str = "server_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "server_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, code), status_code=status)


def prompt_text(body: dict) -> str:
    """The text the prefix policy keys on: a completion's (first) prompt, or a chat's messages in order."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"<{m.get('role')}>{content or ''}")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return " ".join(str(t) for t in prompt)
    return prompt if isinstance(prompt, str) else ""


async def until_down(inst: Replica, awaitable):
    """Await `awaitable` unless the instance goes down first (then InstanceDown)."""
    if not inst.healthy:
        raise InstanceDown(inst.url, "is out of routing (its health check failed)")
    work = asyncio.ensure_future(awaitable)
    down = asyncio.ensure_future(inst.down.wait())
    try:
        await asyncio.wait({work, down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        down.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(BaseException):
        await work
    raise InstanceDown(inst.url, "stopped answering its health checks")


class Proxy:
    """Sends one request to one instance and passes its answer back, counting load and outcomes."""

    def __init__(self, client: httpx.AsyncClient, metrics: RouterMetrics) -> None:
        self.client = client
        self.metrics = metrics

    def _done(self, inst: Replica, role: str, outcome: str, start: float) -> None:
        inst.in_flight -= 1
        self.metrics.requests.labels(inst.url, role, outcome).inc()
        self.metrics.latency.labels(inst.url, role).observe(time.monotonic() - start)

    async def forward(self, inst: Replica, role: str, path: str, content: bytes, headers: dict[str, str],
                      stream: bool, start: float, extra_load: list[Replica] = ()) -> Response:
        """Raises httpx.ConnectError when nothing reached the instance (the caller may retry elsewhere)."""
        inst.in_flight += 1
        inst.routed += 1
        for other in extra_load:  # a disaggregated request's prefill instance, busy until the first byte
            other.in_flight += 1
        released = False

        def release_extra() -> None:
            nonlocal released
            if not released:
                released = True
                for other in extra_load:
                    other.in_flight -= 1

        request = self.client.build_request("POST", inst.url + path, content=content, headers=headers)
        try:
            upstream = await until_down(inst, self.client.send(request, stream=True))
        except httpx.ConnectError:
            release_extra()
            inst.in_flight -= 1
            inst.routed -= 1
            raise
        except (httpx.HTTPError, InstanceDown) as exc:
            release_extra()
            return self._failed(inst, role, exc, start)
        self.metrics.first_byte.labels(inst.url, role).observe(time.monotonic() - start)
        is_stream = stream and upstream.status_code == 200
        if not is_stream:
            try:
                body = await until_down(inst, upstream.aread())
            except (httpx.HTTPError, InstanceDown) as exc:
                return self._failed(inst, role, exc, start)
            finally:
                release_extra()
                await upstream.aclose()
            self._done(inst, role, "ok" if upstream.status_code < 400 else "status", start)
            return Response(body, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type", "application/json"))

        async def chunks():
            outcome = "ok"
            pieces = upstream.aiter_raw()
            try:
                while True:
                    try:
                        piece = await until_down(inst, pieces.__anext__())
                    except StopAsyncIteration:
                        break
                    release_extra()
                    yield piece
            except (httpx.HTTPError, InstanceDown) as exc:
                outcome = "failed"
                inst.failures += 1
                yield f"data: {json.dumps(error_body(self._message(inst, exc)))}\n\n".encode()
            finally:
                release_extra()
                await upstream.aclose()
                self._done(inst, role, outcome, start)

        return StreamingResponse(chunks(), status_code=200, media_type="text/event-stream")

    @staticmethod
    def _message(inst: Replica, exc: Exception) -> str:
        if isinstance(exc, InstanceDown):
            return f"the request failed: {exc}"
        return f"the request failed: instance {inst.url} stopped answering ({type(exc).__name__}: {exc})"

    def _failed(self, inst: Replica, role: str, exc: Exception, start: float) -> JSONResponse:
        inst.failures += 1
        self._done(inst, role, "failed", start)
        return error_response(502, self._message(inst, exc), code="instance_unavailable")


def build_router_app(workers: list[str] = (), policy: str = "prefix", prefill: list[str] = (),
                     decode: list[str] = (), health_interval: float = 1.0, health_timeout: float = 5.0,
                     health_failures: int = 2) -> FastAPI:
    if workers and (prefill or decode):
        raise ValueError("give either --worker replicas or --prefill and --decode instances, not both")
    if bool(prefill) != bool(decode):
        raise ValueError("disaggregated serving needs at least one --prefill and one --decode instance")
    if not workers and not prefill:
        raise ValueError("give at least one --worker URL (or --prefill and --decode URLs)")
    replicas = [Replica(u) for u in workers]
    prefills = [Replica(u) for u in prefill]
    decodes = [Replica(u) for u in decode]
    roles = [("worker", r) for r in replicas] + [("prefill", r) for r in prefills] + [("decode", r) for r in decodes]
    router = Router(replicas, policy) if replicas else None
    prefill_router, decode_router = Router(prefills, "least_load"), Router(decodes, "least_load")
    metrics = RouterMetrics()
    state: dict[str, object] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(connect=5.0, read=None, write=60.0, pool=None)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            checker = HealthChecker([r for _, r in roles], client, health_interval, health_timeout, health_failures)
            state["proxy"] = Proxy(client, metrics)
            state["client"] = client
            checker.start()
            yield
            await checker.stop()

    app = FastAPI(title="fuselm router", summary="OpenAI-compatible router over fuselm instances", lifespan=lifespan)

    async def route(request: Request, path: str) -> Response:
        start = time.monotonic()
        content = await request.body()
        try:
            body = json.loads(content)
        except ValueError as exc:
            return error_response(400, f"the request body is not valid JSON: {exc}", "invalid_request_error")
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object", "invalid_request_error")
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED_HEADERS}
        stream = body.get("stream") is True
        proxy: Proxy = state["proxy"]  # type: ignore[assignment]
        tried: set[str] = set()
        while True:
            extra: list[Replica] = []
            if router is not None:
                role, inst = "worker", router.choose(prompt_text(body))
            else:
                role, inst = "decode", decode_router.choose("")
                pre = prefill_router.choose("")
                if pre is None:
                    return error_response(503, "no prefill instance is healthy", code="no_healthy_instance")
                headers[PREFILL_HEADER] = pre.url
                extra = [pre]
            if inst is None or inst.url in tried:
                return error_response(503, f"no healthy {role} instance to serve the request",
                                      code="no_healthy_instance")
            try:
                return await proxy.forward(inst, role, path, content, headers, stream, start, extra)
            except httpx.ConnectError:
                tried.add(inst.url)
                inst.mark_down("it refused a connection")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await route(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await route(request, "/v1/chat/completions")

    async def any_instance(method: str, path: str, request: Request) -> Response:
        client: httpx.AsyncClient = state["client"]  # type: ignore[assignment]
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED_HEADERS}
        content = await request.body() if method == "POST" else None
        for _, inst in roles:
            if inst.healthy and not (router is None and inst in prefills):
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.request(method, inst.url + path, content=content, headers=headers, timeout=30)
                    return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))
        return error_response(503, "no healthy instance", code="no_healthy_instance")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await any_instance("GET", "/v1/models", request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await any_instance("POST", "/tokenize", request)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await any_instance("POST", "/detokenize", request)

    @app.get("/health")
    async def health() -> Response:
        serving = (router.healthy() if router is not None else prefill_router.healthy() and decode_router.healthy())
        if serving:
            return Response(status_code=200)
        return error_response(503, "no healthy instance to route to", code="no_healthy_instance")

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.render(roles), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/status")
    async def status() -> dict:
        return {
            "policy": policy if router is not None else "disaggregated",
            "cache_routed": router.cache_routed if router is not None else 0,
            "instances": [{"url": inst.url, "role": role, "healthy": inst.healthy, "in_flight": inst.in_flight,
                           "routed": inst.routed, "failures": inst.failures, **inst.stats} for role, inst in roles],
        }

    return app
