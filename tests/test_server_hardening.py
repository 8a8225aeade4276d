"""Bad and abusive requests over real sockets: each is refused with a 4xx in OpenAI's error shape naming
the field, while another client's /health answers at once and its stream keeps flowing, and every KV
block is back in the pool afterwards.

Covers the server's limits (body size, prompt characters before tokenising, prompts x n, stop strings,
logprobs, priority) and strict request validation (finite numbers, no bool or string for a number, no
string for a bool, no lone surrogates in any text field).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from fuselm.server.app import build_app
from fuselm.server.limits import PRIORITY_RANGE, ServerLimits, max_chars_per_token
from server_helpers import MODEL, BackgroundStream, ServerThread, pool_is_full, wait_until

LIMITS = ServerLimits(max_request_body_bytes=64 * 1024, max_sequences_per_request=16, max_stop_strings=4,
                      max_stop_string_chars=16, max_logprobs=5)
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def limited(engine):
    """A server with small limits on the module's engine."""
    srv = ServerThread(build_app(engine, MODEL, limits=LIMITS)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def with_priority(engine):
    srv = ServerThread(build_app(engine, MODEL, limits=ServerLimits(allow_request_priority=True))).start()
    yield srv
    srv.stop()


def max_prompt_chars(engine) -> int:
    """The longest text that could fit in max_model_len tokens: one longest vocabulary entry per token."""
    vocab = engine.tokenizer.hf.get_vocab(with_added_tokens=True)
    longest = max(len(piece) for piece in vocab)
    assert max_chars_per_token(engine.tokenizer) == longest
    return engine.max_model_len * longest


def send(client: httpx.Client, path: str, body, headers: dict | None = None) -> httpx.Response:
    """POST a dict as JSON, or a str / bytes / byte iterator as the raw body."""
    if isinstance(body, dict):
        return client.post(path, json=body, headers=headers)
    return client.post(path, content=body, headers={"content-type": "application/json", **(headers or {})})


def refused_while_serving(srv: ServerThread, engine, path: str, body, status: int, param: str | None,
                          code: str | None = None, headers: dict | None = None) -> dict:
    """Send the bad request while another client streams; check the refusal, that /health answered fast
    and the stream kept going meanwhile, and that the pool is full once the stream is closed."""
    with BackgroundStream(srv.base_url) as stream, httpx.Client(base_url=srv.base_url, timeout=60) as bad, \
            httpx.Client(base_url=srv.base_url, timeout=60) as other:
        sent = time.monotonic()
        r = send(bad, path, body, headers)
        answered = time.monotonic()
        t0 = time.monotonic()
        assert other.get("/health").status_code == 200
        assert time.monotonic() - t0 < 0.5, "/health was slow while the bad request was refused"
        assert wait_until(lambda: stream.events_after(answered) >= 3, 10), "the other stream stalled"
        assert stream.longest_gap(sent, answered) < 1.0, "the other stream stalled while the request was refused"
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code), error
    assert wait_until(lambda: pool_is_full(engine)), "KV blocks did not come back"
    return error


# ---- limits -------------------------------------------------------------------------------------------


def test_body_over_limit_413_from_content_length(limited, engine):
    body = json.dumps({"model": MODEL, "prompt": "x" * (64 * 1024)})
    error = refused_while_serving(limited, engine, "/v1/completions", body, 413, None, "request_too_large")
    assert "65536" in error["message"]


def test_body_over_limit_413_while_streaming_in(limited, engine):
    """A chunked body with no Content-Length is cut off once it passes the limit, before it is parsed."""
    sent = []

    def chunks():
        yield b'{"prompt": "'
        for _ in range(200):  # 800 KiB, far past the 64 KiB limit
            sent.append(4096)
            yield b"y" * 4096
        yield b'"}'

    refused_while_serving(limited, engine, "/v1/chat/completions", chunks(), 413, None, "request_too_large")


def test_body_under_limit_is_served(limited):
    prompt = "It was the best of times " * 100
    r = httpx.post(f"{limited.base_url}/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text


def test_prompt_chars_refused_before_tokenising(server, engine, monkeypatch):
    calls = []
    real = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    too_many = max_prompt_chars(engine) + 1
    for path, body, param in [
        ("/v1/completions", {"prompt": "a" * too_many}, "prompt"),
        ("/v1/completions", {"prompt": ["fine", "b" * too_many]}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "c" * too_many}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "d" * too_many}]}]},
         "messages"),
    ]:
        calls.clear()
        error = refused_while_serving(server, engine, path, body, 400, param, "context_length_exceeded")
        assert "max_model_len" in error["message"]
        assert max(calls, default=0) < too_many, f"{path} tokenised the over-long text before refusing it"


def test_tokenize_is_bounded_by_the_body_size_not_the_context(server, engine):
    """/tokenize only counts: a text longer than any prompt could be (a benchmark client tokenising its
    corpus) is tokenised in the pool, bounded by the body size limit, not refused by max_model_len."""
    text = "It was the best of times, it was the worst of times. " * (max_prompt_chars(engine) // 40)
    assert len(text) > max_prompt_chars(engine)
    r = httpx.post(f"{server.base_url}/tokenize", json={"prompt": text}, timeout=60)
    assert r.status_code == 200 and r.json()["tokens"] == engine.tokenizer.encode(text)


def test_prompt_at_the_bound_is_tokenised_then_measured(server, engine):
    """A text just inside the character bound is tokenised (in the pool) and then judged by its token count."""
    r = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "a" * max_prompt_chars(engine)}, timeout=60)
    assert r.status_code == 200 and r.json()["count"] == len(engine.tokenizer.encode("a" * max_prompt_chars(engine)))


@pytest.mark.parametrize("body,param", [
    ({"prompt": ["a", "b", "c", "d"], "n": 5}, "n"),
    ({"prompt": [[5, 6]] * 17}, "prompt"),
    ({"prompt": "a", "n": 17}, "n"),
])
def test_sequences_per_request(limited, engine, body, param):
    error = refused_while_serving(limited, engine, "/v1/completions", {**body, "max_tokens": 2}, 400, param)
    assert "16" in error["message"]


def test_sequences_at_the_limit_are_served(limited):
    r = httpx.post(f"{limited.base_url}/v1/completions", json={"prompt": ["a", "b", "c", "d"], "n": 4,
                                                               "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 16


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "a", "stop": ["w", "x", "y", "z", "v"]}, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": "s" * 17}, "stop"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": ["ok", "s" * 17]}, "stop"),
    ("/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
])
def test_stop_and_logprobs_limits(limited, engine, path, body, param):
    refused_while_serving(limited, engine, path, {**body, "max_tokens": 2}, 400, param)


def test_stop_and_logprobs_at_the_limits_are_served(limited):
    with httpx.Client(base_url=limited.base_url, timeout=60) as c:
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "stop": ["w", "x", "y", "s" * 16],
                                               "logprobs": 5}).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "logprobs": True,
                                                    "top_logprobs": 5}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_priority_needs_the_server_flag(server, engine, path):
    body = {"prompt": "a"} if path == "/v1/completions" else {"messages": CHAT}
    error = refused_while_serving(server, engine, path, {**body, "priority": -10 ** 30 // 10 ** 24}, 400,
                                  "priority")
    assert "--allow-request-priority" in error["message"]
    assert httpx.post(f"{server.base_url}{path}", json={**body, "max_tokens": 1, "priority": 0},
                      timeout=60).status_code == 200


def test_priority_range_when_enabled(with_priority, engine):
    low, high = PRIORITY_RANGE
    for bad in (low - 1, high + 1):
        refused_while_serving(with_priority, engine, "/v1/completions", {"prompt": "a", "priority": bad}, 400,
                              "priority")
    for ok in (low, -1, high):
        r = httpx.post(f"{with_priority.base_url}/v1/completions", json={"prompt": "a", "max_tokens": 1,
                                                                         "priority": ok}, timeout=60)
        assert r.status_code == 200, r.text


# ---- strict validation ----------------------------------------------------------------------------------

STRICT_CASES = [
    # JSON's NaN / Infinity literals (Python's parser accepts them)
    ("/v1/completions", '{"prompt": "a", "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"prompt": "a", "top_p": Infinity}', "top_p"),
    ("/v1/completions", '{"prompt": "a", "repetition_penalty": NaN}', "repetition_penalty"),
    ("/v1/completions", '{"prompt": "a", "presence_penalty": -Infinity}', "presence_penalty"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], "min_p": NaN}', "min_p"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], "frequency_penalty": Infinity}',
     "frequency_penalty"),
    # no bool or string for a number, no string for a bool
    ("/v1/completions", {"prompt": "a", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "a", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "a", "n": True}, "n"),
    ("/v1/completions", {"prompt": "a", "echo": 1}, "echo"),
    ("/v1/completions", {"prompt": [True, 5]}, "prompt"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": False}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": "true"}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "stop_token_ids": [True]}, "stop_token_ids"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    # lone surrogates in every kind of text field
    ("/v1/completions", '{"prompt": "ab\\ud800c"}', "prompt"),
    ("/v1/completions", '{"prompt": ["fine", "\\udc00"]}', "prompt"),
    ("/v1/completions", '{"prompt": "a", "stop": "\\ud800"}', "stop"),
    ("/v1/completions", '{"prompt": "a", "stop": ["ok", "x\\udfff"]}', "stop"),
    ("/v1/completions", '{"prompt": "a", "model": "\\ud800"}', "model"),
    ("/v1/completions", '{"prompt": "a", "user": "\\ud800"}', "user"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi", "name": "\\udbff"}]}', "messages"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/detokenize", '{"tokens": [5], "model": "\\ud800"}', "model"),
]


@pytest.mark.parametrize("path,body,param", STRICT_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(STRICT_CASES)])
def test_strict_validation(server, engine, path, body, param):
    refused_while_serving(server, engine, path, body, 400, param)


def test_surrogate_pairs_are_fine(server, engine):
    """A correctly paired surrogate escape is one ordinary character (U+1F600)."""
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        r = send(c, "/tokenize", '{"prompt": "smile \\ud83d\\ude00"}')
        assert r.status_code == 200 and r.json()["tokens"] == engine.tokenizer.encode("smile \U0001F600")
        r = send(c, "/v1/completions", '{"prompt": "\\ud83d\\ude00", "max_tokens": 1, "temperature": 0}')
        assert r.status_code == 200, r.text


def test_integers_for_floats_are_fine(server):
    r = httpx.post(f"{server.base_url}/v1/completions",
                   json={"prompt": "a", "max_tokens": 1, "temperature": 0, "top_p": 1, "presence_penalty": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
