"""The server's raw HTTP behaviour with httpx: SSE framing, every error shape and status, the API key,
and that the server keeps serving correctly after each failure (including a failed engine step).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from fuselm.server.app import build_app
from server_helpers import MODEL, ServerThread, wait_until


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


NORMAL = {"model": MODEL, "prompt": "It was the best of times", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference(http):
    r = http.post("/v1/completions", json=NORMAL)
    assert r.status_code == 200
    return r.json()["choices"][0]["text"]


def assert_still_serving(http, reference) -> None:
    r = http.post("/v1/completions", json=NORMAL)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference


def sse_events(raw: str) -> list[str]:
    assert raw.endswith("\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    assert events[-1] == "data: [DONE]"
    return [e[len("data: "):] for e in events]


def test_completion_sse_framing(http, reference):
    with http.stream("POST", "/v1/completions",
                     json={**NORMAL, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    payloads = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert {p["object"] for p in payloads} == {"text_completion"}
    assert "".join(p["choices"][0]["text"] for p in payloads if p["choices"]) == reference
    finishes = [p["choices"][0]["finish_reason"] for p in payloads if p["choices"] and p["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 6


def test_chat_sse_framing(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        raw = r.read().decode()
    payloads = [json.loads(e) for e in sse_events(raw)[:-1]]
    deltas = [p["choices"][0]["delta"] for p in payloads]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(set(d) == {"content"} for d in deltas[1:-1]) and deltas[-1] == {}
    assert [p["choices"][0]["finish_reason"] for p in payloads] == [None] * (len(payloads) - 1) + ["length"]
    assert all("usage" not in p or p["usage"] is None for p in payloads)  # not asked for


TOO_LONG = "the quick brown fox " * 300
CHAT = [{"role": "user", "content": "Hi"}]
ERROR_CASES = [
    ("/v1/completions", "{not json", None),
    ("/v1/completions", "[1, 2", None),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": "two"}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"prompt": TOO_LONG}, "prompt"),
    ("/v1/completions", {"prompt": TOO_LONG, "stream": True}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
    ("/v1/completions", {"prompt": ["fine", TOO_LONG]}, "prompt"),
    ("/v1/completions", {"prompt": [[5, 99999]]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "nope"}, "model"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}], "stream": True}, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, None),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "nope", "stream": True}, "model"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, None),
    ("/detokenize", {"tokens": [1, 100000]}, "tokens"),
]


@pytest.mark.parametrize("path,body,param", ERROR_CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(ERROR_CASES)])
def test_invalid_requests_get_400(http, reference, path, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert_still_serving(http, reference)


# Every check that raises InvalidRequestError, one case per field: the body's `param` and `code` are the
# error's attributes (some differ from the message's first word: max_tokens, max_completion_tokens, messages).
FIELD_CASES = [
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature", None),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, "top_p", None),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, "top_k", None),
    ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, "min_p", None),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty", None),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": -3}, "presence_penalty", None),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": 2.5}, "frequency_penalty", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens", None),
    ("/v1/completions", {"prompt": "hi", "min_tokens": -1}, "min_tokens", None),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, "min_tokens", None),
    ("/v1/completions", {"prompt": "hi", "stop": ["ok", ""]}, "stop", None),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids", None),
    ("/v1/completions", {"prompt": TOO_LONG}, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": [[5, 99999]]}, "prompt", None),
    ("/v1/completions", {"prompt": []}, "prompt", None),
    ("/v1/completions", {"prompt": "hi", "model": "nope"}, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 5000}, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 5000}, "max_completion_tokens",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens", None),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens", None),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": -0.5}, "temperature", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", None),
    ("/v1/chat/completions", {"messages": CHAT, "model": "nope"}, "model", "model_not_found"),
    ("/detokenize", {"tokens": [1, 100000]}, "tokens", None),
]


@pytest.mark.parametrize("path,body,param,code", FIELD_CASES,
                         ids=[f"{c[2]}-{i}" for i, c in enumerate(FIELD_CASES)])
def test_error_param_is_the_field(http, path, body, param, code):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error


def test_specific_error_details(http):
    long = http.post("/v1/completions", json={"prompt": TOO_LONG}).json()["error"]
    assert long["code"] == "context_length_exceeded" and "max_model_len" in long["message"]
    bad_json = http.post("/v1/completions", content="{", headers={"content-type": "application/json"})
    assert "JSON" in bad_json.json()["error"]["message"]
    assert http.post("/v1/completions", json={"prompt": "hi", "model": "nope"}).json()["error"]["code"] == \
        "model_not_found"


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/nothing", 404), ("POST", "/nowhere", 404),
                                                ("GET", "/v1/completions", 405)])
def test_unknown_routes(http, reference, method, path, status):
    r = http.request(method, path)
    assert r.status_code == status
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert_still_serving(http, reference)


def test_api_key(engine, reference):
    srv = ServerThread(build_app(engine, MODEL, api_key="sekret")).start()
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                r = c.post("/v1/completions", json=NORMAL, headers=headers)
                assert r.status_code == 401
                assert r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models").status_code == 401
            assert c.post("/tokenize", json={"prompt": "a"}).status_code == 401
            assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
            ok = c.post("/v1/completions", json=NORMAL, headers={"Authorization": "Bearer sekret"})
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == reference
        wrong = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="sekret", max_retries=0)
        assert right.completions.create(**{k: v for k, v in NORMAL.items() if k != "ignore_eos"},
                                        extra_body={"ignore_eos": True}).choices[0].text == reference
    finally:
        srv.stop()


def test_failed_engine_step_fails_only_that_request(engine, http, reference):
    runner = engine.engine.runner

    def boom(out):
        del runner.execute  # fail once, then the real method again
        raise RuntimeError("injected failure")

    try:
        runner.execute = boom
        r = http.post("/v1/completions", json=NORMAL)
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error" and "injected failure" in r.json()["error"]["message"]
        assert_still_serving(http, reference)
        runner.execute = boom
        with http.stream("POST", "/v1/completions", json={**NORMAL, "stream": True}) as s:
            assert s.status_code == 200
            events = sse_events(s.read().decode())
        assert "injected failure" in json.loads(events[-2])["error"]["message"]
    finally:
        runner.__dict__.pop("execute", None)
    assert_still_serving(http, reference)
    e = engine.engine
    assert wait_until(lambda: e.kv.num_free_blocks == e.runner.num_blocks)


def test_tokenize_detokenize(http, engine):
    tok = engine.tokenizer
    r = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == engine.max_model_len
    chat = http.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert tok.decode(chat, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    text = http.post("/detokenize", json={"tokens": tok.encode("Hello world", add_special_tokens=False)}).json()
    assert text["prompt"] == "Hello world"
