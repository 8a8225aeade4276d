"""The OpenAI-compatible server end to end over real sockets: the official openai client, 32 concurrent
streams against offline greedy results, client disconnects freeing KV blocks, metrics and logs.

One uvicorn server (in a thread, tiny model, float32 on CPU) serves the whole module.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fuselm import LLM, SamplingParams
from fuselm.server.metrics import METRIC_NAMES
from server_helpers import MODEL, slow_down_steps, wait_until

WORDS = "the quick brown fox jumps over lazy dog it was best of times Paris is capital France".split()


def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{base_url}/metrics").text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def make_prompts(count: int) -> list[str]:
    return [" ".join(WORDS[i % 5:i % 5 + 2 + i % 9]) + f" {i}" for i in range(count)]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(tiny_llama[0], dtype="float32", device="cpu")


def greedy(**extra) -> dict:
    return dict(temperature=0, extra_body={"ignore_eos": True, **extra})


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_completion_matches_offline(client, offline):
    out = client.completions.create(model=MODEL, prompt="Paris is the capital of", max_tokens=10, **greedy())
    ref = offline.generate("Paris is the capital of", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                           use_tqdm=False)[0]
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].text == ref.outputs[0].text
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_token_ids), 10)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 10


def test_chat_matches_offline(client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a capital."}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8, **greedy())
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.outputs[0].text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids) and out.usage.completion_tokens == 8
    # content as a list of text parts renders the same prompt
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             messages[1]]
    again = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=8, **greedy())
    assert again.choices[0].message.content == out.choices[0].message.content


def test_chat_streaming(client):
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=12, **greedy())
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=12, stream=True,
        stream_options={"include_usage": True}, **greedy()))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_n2_and_multiple_prompts(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                         max_tokens=6, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 12
    multi = client.completions.create(model=MODEL, prompt=["one two", "three four five"], n=2, max_tokens=4,
                                      temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in multi.choices) == [0, 1, 2, 3]
    assert multi.usage.completion_tokens == 16
    streamed = client.completions.create(model=MODEL, prompt=["one two", "three four five"], n=2, max_tokens=4,
                                         temperature=1.0, seed=5, stream=True, extra_body={"ignore_eos": True})
    texts: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in multi.choices}


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=6, logprobs=3, **greedy())
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) <= 4  # the top 3 plus the chosen token
        assert top[token] == value == max(top.values())  # greedy picks the most likely token
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          logprobs=True, top_logprobs=3, **greedy())
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0])
    echo = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=2, logprobs=1, echo=True,
                                     **greedy())
    assert echo.choices[0].text.startswith("The quick brown")
    assert echo.choices[0].logprobs.token_logprobs[0] is None  # the first prompt token has no logprob
    assert len(echo.choices[0].logprobs.tokens) == out.usage.prompt_tokens + 2


def test_seed_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="It was the best", max_tokens=16, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_strings(client):
    prompt = "Call me Ishmael."
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, **greedy()).choices[0].text
    k = next(i for i in range(2, len(full) - 2) if full.find(full[i:i + 2]) == i and "\ufffd" not in full[i:i + 2])
    stop = full[k:k + 2]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, stop=[stop], **greedy())
    assert out.choices[0].text == full[:k] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, stop=stop, stream=True,
                                         **greedy())
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[:k]  # held back, never cut after


def test_32_concurrent_streams_match_offline(server, engine, offline):
    prompts = make_prompts(32)
    ref = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    peak = 0

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)

        async def one(prompt: str) -> str:
            text = ""
            async for chunk in await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                                                 stream=True, **greedy()):
                text += chunk.choices[0].text
            return text

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, engine.snapshot.num_running)
                await asyncio.sleep(0.002)

        watcher = asyncio.ensure_future(watch())
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            watcher.cancel()
            await aclient.close()

    texts = asyncio.run(run())
    assert texts == [r.outputs[0].text for r in ref]
    assert peak > 1  # requests from different HTTP connections shared engine steps


def _pool_is_full(engine) -> bool:
    e = engine.engine
    return e.kv.num_free_blocks == e.runner.num_blocks and not e.has_unfinished_requests()


@pytest.fixture
def slow_steps(engine):
    """On the tiny model a 900-token request would otherwise finish in well under the 0.3 s a test
    waits before it disconnects."""
    undo = slow_down_steps(engine)
    yield
    undo()


def test_disconnect_mid_stream_aborts(server, engine, slow_steps):
    before = scrape(server.base_url)
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break
            assert engine.engine.has_unfinished_requests()
    assert wait_until(lambda: _pool_is_full(engine)), "the aborted request's KV blocks did not come back"
    after = scrape(server.base_url)
    key = ("fuselm_requests_total", (("finish_reason", "abort"),))
    assert after.get(key, 0) == before.get(key, 0) + 1
    generated = after[("fuselm_generation_tokens_total", ())] - before[("fuselm_generation_tokens_total", ())]
    assert 3 <= generated < 900


def test_disconnect_while_waiting_non_streaming_aborts(server, engine, slow_steps):
    key = ("fuselm_requests_total", (("finish_reason", "abort"),))
    before = scrape(server.base_url).get(key, 0)
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    assert wait_until(lambda: _pool_is_full(engine)), "the abandoned request kept running"
    assert scrape(server.base_url).get(key, 0) == before + 1


def test_metrics_count_requests(server, client):
    before = scrape(server.base_url)
    shared = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 2
    usages = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, **greedy()).usage
              for p in (shared + "one", shared + "two")]  # the second finds the first's blocks cached
    usages.append(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=3, **greedy()).usage)
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in METRIC_NAMES:
        assert name in text
    after = scrape(server.base_url)

    def delta(name: str, *labels) -> float:
        return after.get((name, tuple(labels)), 0) - before.get((name, tuple(labels)), 0)

    assert delta("fuselm_requests_total", ("finish_reason", "length")) == 3
    assert delta("fuselm_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("fuselm_generation_tokens_total") == sum(u.completion_tokens for u in usages) == 13
    for hist in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert delta(f"fuselm_{hist}_seconds_count") == 3
    assert delta("fuselm_inter_token_latency_seconds_count") == 13 - 3  # every token after the first
    assert after[("fuselm_num_requests_running", ())] == 0 and after[("fuselm_num_requests_waiting", ())] == 0
    assert 0 < after[("fuselm_prefix_cache_hit_rate", ())] <= 1
    assert 0 <= after[("fuselm_kv_cache_usage_ratio", ())] <= 1


def test_request_and_status_log_lines(client, caplog):
    caplog.set_level(logging.INFO, logger="fuselm")
    out = client.completions.create(model=MODEL, prompt="log me", max_tokens=4, **greedy())

    def logged(*needles: str) -> bool:
        return any(all(n in r.getMessage() for n in needles) for r in caplog.records)

    assert wait_until(lambda: logged(out.id, "generated 4 tokens", "TTFT"), 5)
    assert wait_until(lambda: logged("engine:", "running", "waiting", "KV cache", "prefix cache hit rate",
                                     "tok/s"), 5)
