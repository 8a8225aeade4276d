"""Structured output and tool calling through the server, over a real socket with the official openai
client, on the embedded SmolLM2-135M-Instruct sampling at temperature 1.

References are independent of fuselm: `jsonschema` validates JSON outputs and tool-call arguments,
`re.fullmatch` checks regex outputs, the tokenizer's own ids check token constraints. Streaming
deltas must reassemble to the non-streamed message; every unsupported field is a 400 naming it.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server_helpers import ServerThread

MODEL = "smol"
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server():
    from fuselm.engine.async_engine import AsyncLLMEngine
    from fuselm.server.app import build_app

    engine = AsyncLLMEngine.from_options()
    srv = ServerThread(build_app(engine, MODEL)).start()
    yield srv
    srv.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


class Pet(BaseModel):
    name: str = Field(max_length=12)
    species: str = Field(pattern="^(cat|dog|fish)$")
    age: int = Field(ge=0, le=30)


class Person(BaseModel):
    name: str = Field(max_length=16)
    pets: list[Pet] = Field(max_length=2)


def assert_json_or_cut_prefix(choice, schema: dict, check) -> None:
    """A finished answer must parse and pass `check`; one cut by max_tokens (sampling at temperature 1
    can wander inside a string) must still be a prefix that xgrammar's own JSON-schema grammar accepts."""
    if choice.finish_reason != "length":
        assert check(json.loads(choice.message.content))
    else:
        assert_prefix_of(choice.message.content, schema)


def assert_prefix_of(text: str, schema: dict) -> None:
    import xgrammar as xgr

    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo(["a"])).compile_grammar(
        xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=True))
    assert xgr.GrammarMatcher(compiled).accept_string(text), text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parse_and_json_schema_validate(client, seed):
    ask = [{"role": "user", "content": "Describe a person and their pets as JSON."}]
    parsed = client.chat.completions.parse(model=MODEL, messages=ask, response_format=Person, temperature=1,
                                           seed=seed, max_tokens=300)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    schema = {"type": "object", "properties": {"id": {"type": "integer", "minimum": -5, "maximum": 5},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b c"]},
                                                        "minItems": 1, "maxItems": 3}},
              "required": ["id", "tags"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, messages=ask, temperature=1, seed=seed, max_tokens=200, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}})
    for choice in out.choices:
        assert_json_or_cut_prefix(choice, schema, lambda doc: jsonschema.validate(doc, schema) is None)
    obj = client.chat.completions.create(model=MODEL, messages=ask, temperature=1, seed=seed, max_tokens=300,
                                         response_format={"type": "json_object"})
    assert_json_or_cut_prefix(obj.choices[0], {"type": "object"}, lambda doc: isinstance(doc, dict))


@pytest.mark.parametrize("seed", [0, 1])
def test_regex_and_choice_extra_body(client, seed):
    pattern = r"[A-Z][a-z]{2,5}-[0-9]{2}"
    chat = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1, seed=seed, max_tokens=20,
                                          extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, chat.choices[0].message.content)
    options = ["sunny", "rainy", "snow storm"]
    chat = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1, seed=seed, max_tokens=20,
                                          extra_body={"structured_outputs": {"choice": options}})
    assert chat.choices[0].message.content in options
    done = client.completions.create(model=MODEL, prompt="The weather today is", temperature=1, seed=seed,
                                     max_tokens=20, extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, done.choices[0].text)
    done = client.completions.create(model=MODEL, prompt="The weather today is", temperature=1, seed=seed,
                                     max_tokens=20, extra_body={"guided_choice": options})
    assert done.choices[0].text in options


def test_token_constraints(server, client):
    def ids(text: str) -> list[int]:
        return httpx.post(f"{server.base_url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

    prompt = "The capital of France is"
    plain = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6,
                                      extra_body={"ignore_eos": True}).choices[0].text
    forced = ids(" banana")[0]
    biased = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4,
                                       logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert ids(biased.choices[0].text) == [forced] * 4
    allowed = ids(" yes") + ids(" no")
    only = client.completions.create(model=MODEL, prompt=prompt, temperature=1, seed=3, max_tokens=6,
                                     extra_body={"ignore_eos": True, "allowed_token_ids": allowed})
    assert set(ids(only.choices[0].text)) <= set(allowed)
    first_word = plain.split()[0]
    banned = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6,
                                       extra_body={"ignore_eos": True, "bad_words": [first_word]})
    assert first_word not in banned.choices[0].text.split()[:1] and banned.choices[0].text != plain


def _reassemble(stream) -> tuple[str, dict[int, list[str]], str | None]:
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.id is not None:
                assert call.index not in calls and call.function.name and call.function.arguments == ""
                calls[call.index] = [call.function.name, ""]
            else:
                calls[call.index][1] += call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_and_named_calls_validate(client, seed):
    for parallel in (False, True):
        out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=parallel, temperature=1, seed=seed, max_tokens=300)
        choice = out.choices[0]
        # at temperature 1 parallel calls can go on until max_tokens: then the last call is cut, the others complete
        cut = parallel and choice.finish_reason == "length"
        assert (cut or choice.finish_reason == "tool_calls") and choice.message.tool_calls
        assert parallel or len(choice.message.tool_calls) == 1
        *complete, last = choice.message.tool_calls
        for call in complete:
            jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
        if cut:
            assert_prefix_of(last.function.arguments, PARAMS[last.function.name])
        else:
            jsonschema.validate(json.loads(last.function.arguments), PARAMS[last.function.name])
    named = {"type": "function", "function": {"name": "get_time"}}
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, temperature=1,
                                         seed=seed, max_tokens=100)
    [call] = out.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_calls_reassemble(client, tool_choice):
    args = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0, max_tokens=300)
    whole = client.chat.completions.create(**args).choices[0]
    content, calls, finish = _reassemble(client.chat.completions.create(**args, stream=True))
    assert not content and finish == whole.finish_reason
    assert [calls[i] for i in sorted(calls)] == [[c.function.name, c.function.arguments]
                                                 for c in whole.message.tool_calls]


def test_auto_parses_hermes_calls(client):
    """The model's own text in the Hermes format (here made certain by a regex) becomes tool_calls."""
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    args = dict(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80,
                extra_body={"guided_regex": re.escape(text)})
    choice = client.chat.completions.create(**args).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check.\n"
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris", "unit": "celsius"})
    content, calls, finish = _reassemble(client.chat.completions.create(**args, stream=True))
    assert (content, calls, finish) == ("Let me check.\n", {0: ["get_weather", call.function.arguments]}, "tool_calls")


def test_agent_loop(client):
    messages = list(ASK)
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=200)
    message = first.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})})
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=30)
    assert final.choices[0].message.content


UNSUPPORTED = ["functions", "function_call", "audio", "modalities", "prediction", "web_search_options",
               "reasoning_effort", "best_of", "suffix", "use_beam_search", "prompt_logprobs",
               "guided_decoding_backend", "chat_template", "chat_template_kwargs", "logits_processors"]


@pytest.mark.parametrize("field", UNSUPPORTED)
def test_unsupported_fields_are_400(server, field):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2, field: None}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_json": {"type": "nonsense"}}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
])
def test_bad_constraints_name_their_field(server, extra, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2, **extra}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_model_by_id_and_tokenizer_info(server, client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    info = httpx.get(f"{server.base_url}/tokenizer_info").json()
    assert info["vocab_size"] == 49152 and info["eos_token"] == "<|im_end|>"
