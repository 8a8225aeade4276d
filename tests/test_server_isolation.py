"""One heavy request delays only itself: tokenising and chat-template rendering run in worker pools, never
on the event loop (which answers /health and streams) or the engine thread (which steps every request).
Also what the server shows about itself: the API docs behind the key or off, the served model name.

The slow tokenizer here is the real one behind a delay, standing in for a long text on a big vocabulary
(`tokenizers` releases the GIL while it encodes, as a sleep does).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from fuselm.server.app import build_app, short_model_name
from server_helpers import MODEL, BackgroundStream, ServerThread, pool_is_full, slow_down_steps, wait_until

SLOW = 2.0  # seconds the slow tokenizer takes for a text with the marker
MARKER = "zzslowzz"


@pytest.fixture
def slow_tokenizer(engine, monkeypatch):
    real_encode = engine.tokenizer.encode
    real_template = engine.tokenizer.apply_chat_template

    def encode(text, *args, **kwargs):
        if MARKER in text:
            time.sleep(SLOW)
        return real_encode(text, *args, **kwargs)

    def template(messages, *args, **kwargs):
        if any(MARKER in m["content"] for m in messages):
            time.sleep(SLOW)
        return real_template(messages, *args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", encode)
    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", template)
    return real_encode


HEAVY = [
    ("/v1/completions", {"prompt": f"{MARKER} one", "max_tokens": 2}),
    ("/v1/completions", {"prompt": ["short", f"{MARKER} two"], "max_tokens": 2, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"{MARKER} three"}], "max_tokens": 2}),
    ("/tokenize", {"prompt": f"{MARKER} four"}),
    ("/tokenize", {"messages": [{"role": "user", "content": f"{MARKER} five"}]}),
]


@pytest.mark.parametrize("path,body", HEAVY, ids=[f"{i}-{c[0]}" for i, c in enumerate(HEAVY)])
def test_heavy_tokenising_delays_only_itself(server, engine, slow_tokenizer, path, body):
    result = {}

    def heavy() -> None:
        result["response"] = httpx.post(f"{server.base_url}{path}", json={"model": MODEL, **body}, timeout=60)
        result["time"] = time.monotonic()

    with BackgroundStream(server.base_url) as stream, httpx.Client(base_url=server.base_url, timeout=60) as other:
        started = time.monotonic()
        worker = threading.Thread(target=heavy)
        worker.start()
        time.sleep(0.3)  # the heavy request is being tokenised now
        health_times, short_times = [], []
        while worker.is_alive() and time.monotonic() - started < SLOW - 0.3:
            t0 = time.monotonic()
            assert other.get("/health").status_code == 200
            health_times.append(time.monotonic() - t0)
            t0 = time.monotonic()
            short = other.post("/tokenize", json={"prompt": "a short one"})
            short_times.append(time.monotonic() - t0)
            assert short.json()["tokens"] == slow_tokenizer("a short one")
        probing_ended = time.monotonic()
        worker.join(30)
        assert health_times and max(health_times) < 0.5, health_times
        assert max(short_times) < 0.5, f"a short request waited behind the heavy one: {short_times}"
        assert stream.longest_gap(started, probing_ended) < 0.75 * SLOW, "the engine thread was held up"
    r = result["response"]
    assert r.status_code == 200, r.text
    assert result["time"] - started >= SLOW  # it did take the slow path
    assert wait_until(lambda: pool_is_full(engine))


def test_docs_need_the_api_key(engine):
    srv = ServerThread(build_app(engine, MODEL, api_key="sekret")).start()
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
                r = c.get(path)
                assert r.status_code == 401, path
                assert r.json()["error"]["code"] == "invalid_api_key"
            key = {"Authorization": "Bearer sekret"}
            assert c.get("/openapi.json", headers=key).json()["paths"].keys() >= {"/v1/completions"}
            assert c.get("/docs", headers=key).status_code == 200
            assert c.get("/health").status_code == 200
    finally:
        srv.stop()


def test_docs_can_be_turned_off(engine):
    srv = ServerThread(build_app(engine, MODEL, enable_docs=False)).start()
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert c.get(path).status_code == 404, path
            assert c.post("/tokenize", json={"prompt": "a"}).status_code == 200
    finally:
        srv.stop()


def test_models_shows_the_short_name_never_the_path(engine, tiny_llama):
    path = str(tiny_llama[0])
    assert engine.model_name == path and path.startswith("/")
    srv = ServerThread(build_app(engine)).start()
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            card = c.get("/v1/models").json()["data"][0]
            assert card["id"] == card["root"] == path.rstrip("/").rsplit("/", 1)[-1]
            assert path not in c.get("/v1/models").text
            r = c.post("/v1/completions", json={"model": card["id"], "prompt": "a", "max_tokens": 1})
            assert r.status_code == 200 and r.json()["model"] == card["id"]
    finally:
        srv.stop()


@pytest.mark.parametrize("source,name", [("/models/llama-3-8b/", "llama-3-8b"), ("/m/smol.Q4_1.gguf", "smol.Q4_1"),
                                         ("C:\\models\\qwen", "qwen"), ("relative/dir", "dir")])
def test_short_model_name(source, name):
    assert short_model_name(source) == name


def test_final_only_stream_hands_over_one_finished_output(engine):
    """A non-streaming request's stream gets the finished output only, equal to the last of a full stream."""
    import asyncio

    from fuselm import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def outputs(request_id: str, final_only: bool) -> list:
        stream = await engine.add_request(request_id, "It was the best of times", params, final_only=final_only)
        return [out async for out in stream]

    async def both():
        return await asyncio.gather(outputs("full", False), outputs("final", True))

    undo = slow_down_steps(engine)  # a step of the tiny model outruns the event loop's reads otherwise
    try:
        full, final = asyncio.run(both())
    finally:
        undo()
    assert len(full) > 1 and len(final) == 1 and final[0].finished
    assert final[0].outputs[0].token_ids == full[-1].outputs[0].token_ids
    assert final[0].outputs[0].text == full[-1].outputs[0].text
    assert wait_until(lambda: pool_is_full(engine))
