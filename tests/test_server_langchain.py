"""langchain-openai against the server, over a real socket, on the embedded SmolLM2-135M-Instruct.

What an agent framework does with an OpenAI-compatible endpoint: `bind_tools` with a forced tool
(by name, or "any") must give an AIMessage whose tool_calls validate against the tool's own args
schema (pydantic, independent of fuselm), and `with_structured_output` must return a valid instance
of the pydantic model. Sampling is at temperature 1 with several seeds, so constraint enforcement,
not a lucky greedy path, is what keeps the outputs valid.
"""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import BaseModel, Field

from server_helpers import ServerThread

langchain_openai = pytest.importorskip("langchain_openai")
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402

MODEL = "smol"
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def server():
    from fuselm.engine.async_engine import AsyncLLMEngine
    from fuselm.server.app import build_app

    engine = AsyncLLMEngine.from_options()
    srv = ServerThread(build_app(engine, MODEL)).start()
    yield srv
    srv.stop()
    engine.shutdown()


def chat_model(server, seed: int, temperature: float = 1.0, max_tokens: int = 200):
    return langchain_openai.ChatOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", model=MODEL,
                                       temperature=temperature, seed=seed, max_tokens=max_tokens, max_retries=0,
                                       timeout=120)


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(min_length=1, max_length=20, description="the city")
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


@tool
def add_numbers(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Movie(BaseModel):
    title: str = Field(max_length=24)
    year: int = Field(ge=1900, le=2030)
    genres: list[Annotated[str, Field(max_length=16)]] = Field(min_length=1, max_length=3)  # bounded: fits max_tokens


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tool_choice", ["GetWeather", "any"])
def test_bind_tools_forced_call_validates(server, seed, tool_choice):
    llm = chat_model(server, seed).bind_tools([GetWeather, add_numbers], tool_choice=tool_choice)
    message = llm.invoke([HumanMessage("What is the weather like in Paris?")])
    assert isinstance(message, AIMessage)
    assert message.tool_calls and not message.invalid_tool_calls
    schemas = {"GetWeather": GetWeather, "add_numbers": add_numbers.args_schema}
    for call in message.tool_calls:
        if tool_choice == "GetWeather":
            assert call["name"] == "GetWeather"
        schemas[call["name"]].model_validate(call["args"])
        assert call["id"]


@pytest.mark.parametrize("seed", SEEDS)
def test_bind_tools_decorated_function(server, seed):
    llm = chat_model(server, seed).bind_tools([add_numbers], tool_choice="add_numbers")
    message = llm.invoke("What is 17 plus 25?")
    assert [c["name"] for c in message.tool_calls] and not message.invalid_tool_calls
    for call in message.tool_calls:
        assert call["name"] == "add_numbers"
        args = add_numbers.args_schema.model_validate(call["args"])
        assert add_numbers.invoke(call["args"]) == args.a + args.b


def test_agent_loop_with_tool_result(server):
    llm = chat_model(server, 0)
    first = llm.bind_tools([add_numbers], tool_choice="add_numbers").invoke("What is 17 plus 25?")
    call = first.tool_calls[0]
    result = add_numbers.invoke(call["args"])
    messages = [HumanMessage("What is 17 plus 25?"), first,
                ToolMessage(content=str(result), tool_call_id=call["id"])]
    final = llm.bind_tools([add_numbers]).invoke(messages)  # tool_choice auto: the model may answer in text
    assert isinstance(final, AIMessage) and (final.content or final.tool_calls)


@pytest.mark.parametrize("seed", SEEDS)
def test_with_structured_output_pydantic(server, seed):
    structured = chat_model(server, seed).with_structured_output(Movie)
    movie = structured.invoke("Describe a famous science fiction movie.")
    assert isinstance(movie, Movie)
    Movie.model_validate(movie.model_dump())  # the instance satisfies every constraint, not just the types


def test_with_structured_output_function_calling(server):
    movie = chat_model(server, 3).with_structured_output(Movie, method="function_calling").invoke(
        "Describe a famous science fiction movie.")
    assert isinstance(movie, Movie)

