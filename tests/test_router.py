"""`fuselm router` over real servers on 127.0.0.1: output equal to one instance's, prefix-aware placement
shown by the replicas' own prefix-cache metrics, and a hung replica failing its requests instead of
hanging them."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import pytest
from fastapi import FastAPI, Response
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import MODEL, ServerThread, wait_until

BLOCK = 16


def start_replica(path: str) -> tuple[ServerThread, object]:
    from fuselm.engine.async_engine import AsyncLLMEngine
    from fuselm.server.app import build_app

    engine = AsyncLLMEngine.from_options(path, dtype="float32", device="cpu", log_stats_interval=60,
                                         log_requests=False)
    return ServerThread(build_app(engine, MODEL)).start(), engine


def start_router(urls: list[str], policy: str) -> ServerThread:
    from fuselm.router.app import build_router_app

    return ServerThread(build_router_app(urls, policy, health_interval=0.2, health_timeout=1.0)).start()


@pytest.fixture
def replicas(tiny_llama):
    started = [start_replica(tiny_llama[0]) for _ in range(2)]
    yield [server for server, _ in started]
    for server, engine in started:
        server.stop()
        engine.shutdown()


def gauge(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == name for s in f.samples)


def completions(base_url: str, prompts: list, stream: bool) -> list[list[str]]:
    """Greedy completions, each request's text per choice (streamed chunks joined)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused")
    texts = []
    for prompt in prompts:
        kwargs = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, n=2, stream=stream)
        if stream:
            parts = ["", ""]
            for chunk in client.completions.create(**kwargs):
                for choice in chunk.choices:
                    parts[choice.index] += choice.text
            texts.append(parts)
        else:
            reply = client.completions.create(**kwargs)
            texts.append([c.text for c in sorted(reply.choices, key=lambda c: c.index)])
    return texts


@pytest.mark.parametrize("policy", ["prefix", "round_robin"])
def test_router_output_equals_one_instance(replicas, policy):
    prompts = ["The quick brown fox", "def add(a, b):", "Paris is the capital of", "Call me Ishmael. Some years",
               [5, 17, 42, 99, 120, 7, 300]]
    reference = completions(replicas[0].base_url, prompts, stream=False)
    router = start_router([r.base_url for r in replicas], policy)
    try:
        assert completions(router.base_url, prompts, stream=False) == reference
        assert completions(router.base_url, prompts, stream=True) == reference
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Paris is"}], "max_tokens": 8,
                "temperature": 0}
        direct = httpx.post(replicas[1].base_url + "/v1/chat/completions", json=chat).json()
        routed = httpx.post(router.base_url + "/v1/chat/completions", json=chat).json()
        assert routed["choices"][0]["message"] == direct["choices"][0]["message"]
        status = httpx.get(router.base_url + "/status").json()
        assert all(inst["routed"] > 0 for inst in status["instances"])  # both replicas served
        models = httpx.get(router.base_url + "/v1/models").json()
        assert models["data"][0]["id"] == MODEL
        bad = httpx.post(router.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"  # the replica's error
    finally:
        router.stop()


def shared_prefix_traffic(base_url: str) -> None:
    """3 groups of 4 requests, each group sharing a 64-token (4-block) prefix, interleaved g0 g1 g2 g0 ..."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(5, 384) for _ in range(4 * BLOCK)] for _ in range(3)]
    with httpx.Client(base_url=base_url, timeout=60) as c:
        for i in range(12):
            question = [rng.randrange(5, 384) for _ in range(8)]
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": prefixes[i % 3] + question,
                                                 "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text


@pytest.mark.parametrize("policy", ["prefix", "round_robin"])
def test_prefix_policy_keeps_groups_together(replicas, policy):
    """Each 72-token prompt is looked up in its replica's prefix cache; a group's later requests find its
    4 prefix blocks there only when they land where the group's first one did. All together, each replica's
    hit rate is 3 x 64 hit tokens / 4 x 72 looked up = 2/3; round-robin spreads groups over both replicas."""
    router = start_router([r.base_url for r in replicas], policy)
    try:
        shared_prefix_traffic(router.base_url)
    finally:
        router.stop()
    rates = [gauge(r.base_url, "fuselm_prefix_cache_hit_rate") for r in replicas]
    counts = [gauge(r.base_url, "fuselm_requests") for r in replicas]
    if policy == "prefix":
        assert sorted(counts) == [4, 8]
        assert rates == pytest.approx([2 / 3, 2 / 3])
    else:
        assert counts == [6, 6]
        assert max(rates) < 0.5


def hung_replica() -> tuple[ServerThread, dict]:
    """A replica whose completions never answer and whose /health can be switched off."""
    state = {"healthy": True, "hang": True}
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state["healthy"] else 503)

    @app.post("/v1/completions")
    async def never() -> Response:
        while state["hang"]:
            await asyncio.sleep(0.05)
        return Response(status_code=500)

    return ServerThread(app).start(), state


def test_hung_replica_fails_its_requests_and_comes_back():
    server, state = hung_replica()
    router = start_router([server.base_url], "least_load")
    try:
        with httpx.Client(base_url=router.base_url, timeout=30) as c:
            pending = []

            def send():
                pending.append(c.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}))

            sender = threading.Thread(target=send)
            sender.start()
            time.sleep(0.5)
            state["healthy"] = False
            start = time.monotonic()
            sender.join(20)
            assert pending, "the request hung"
            assert time.monotonic() - start < 5
            r = pending[0]
            assert r.status_code == 502 and server.base_url in r.json()["error"]["message"]
            assert c.get("/health").status_code == 503
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_instance"
            state["healthy"] = True
            assert wait_until(lambda: c.get("/health").status_code == 200, 5)
    finally:
        state["hang"] = False
        router.stop()
        server.stop()


def test_radix_tree_matches_prefixes_and_evicts_least_recently_used():
    from fuselm.router.radix import RadixTree

    tree = RadixTree(max_chars=40)
    tree.insert("system prompt A: question one")
    tree.insert("system prompt A: question two")
    assert tree.match("system prompt A: question three") == len("system prompt A: question t")
    assert tree.match("system prompt B") == len("system prompt ")
    assert tree.num_chars == len("system prompt A: question one") + len("two")  # the shared part once
    tree.match("system prompt A: question two")  # the "two" branch is now the more recent
    tree.insert("other text")  # over 40 characters: the least recently used leaf ("one") goes first
    assert tree.match("system prompt A: question one") == len("system prompt A: question ")
    assert tree.match("system prompt A: question two") == len("system prompt A: question two")
    assert tree.num_chars <= 40


def test_prefix_policy_falls_back_to_least_load_when_imbalanced():
    from fuselm.router.policies import Replica, Router

    replicas = [Replica("http://a"), Replica("http://b")]
    router = Router(replicas, "prefix")
    prompt = "a long shared system prompt, then a question"
    first = router.choose(prompt)
    assert router.choose(prompt) is first  # the cached prefix wins while the load is even
    first.in_flight, other = 6, replicas[1] if first is replicas[0] else replicas[0]
    assert router.choose(prompt) is other  # 6 against 0 in flight: least load
    other.healthy = False
    assert router.choose(prompt) is first  # the only healthy replica
    first.healthy = False
    assert router.choose(prompt) is None
