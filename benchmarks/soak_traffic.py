"""The request mix of benchmarks/soak.py: each scenario, the status it must get, and how it is checked.

Valid scenarios must answer 200 with a well-formed body (the right number of choices, a finish
reason, a stream ending in [DONE]); invalid ones must get their 4xx and an OpenAI-shaped error
body. Every request runs under a deadline, so a hang is reported rather than waited out. The
limits assumed are `fuselm serve`'s defaults (fuselm/server/limits.py).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass

import httpx

HOST = "127.0.0.1"
API_KEY = "soak-key"
MAX_BODY_BYTES = 4 * 1024 * 1024  # ServerLimits.max_request_body_bytes
MAX_STOP_STRINGS = 32
MAX_SEQUENCES = 128
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "List three prime numbers:",
           "Once upon a time, in a quiet village,", "Explain what a hash table is in one sentence."]
STOPS = [".", "\n", " the", "!", ","]


@dataclass
class Outcome:
    scenario: str
    valid: bool
    status: int | None
    expected: tuple[int, ...]
    ok: bool
    total_s: float
    ttft_s: float | None = None
    problem: str | None = None
    problem_kind: str | None = None  # status, 5xx, timeout, connection, body
    # status 0: the client hung up before an answer (on purpose, in the disconnect scenarios)

    def as_dict(self) -> dict:
        return asdict(self)


class Checked(Exception):
    """A response that came back with the expected status but a broken body."""


def chat_body(rng: random.Random, **extra) -> dict:
    return {"model": "soak", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(4, 24), "temperature": 0.8, **extra}


def completion_body(rng: random.Random, **extra) -> dict:
    return {"model": "soak", "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(4, 24), "temperature": 0.8,
            **extra}


def raw(text: str) -> bytes:
    return text.encode()


class Traffic:
    def __init__(self, client: httpx.AsyncClient, deadline: float) -> None:
        self.client = client
        self.deadline = deadline
        self.scenarios = [  # name, weight, valid, coroutine function
            ("chat", 6, True, self.chat), ("chat_stream", 6, True, self.chat_stream),
            ("completion_n_logprobs", 4, True, self.completion_n_logprobs),
            ("completion_stream_stop", 4, True, self.completion_stream_stop),
            ("chat_logprobs_stop_n", 3, True, self.chat_logprobs_stop_n),
            ("completion_two_prompts", 2, True, self.completion_two_prompts),
            ("tokenize", 1, True, self.tokenize),
            ("bad_type", 3, False, self.bad_type), ("non_finite", 2, False, self.non_finite),
            ("surrogate", 2, False, self.surrogate), ("oversize_body", 1, False, self.oversize_body),
            ("oversize_prompt", 1, False, self.oversize_prompt), ("too_many_stops", 1, False, self.too_many_stops),
            ("fan_out", 1, False, self.fan_out), ("unknown_fields", 1, False, self.unknown_fields),
            ("bad_json", 1, False, self.bad_json), ("no_api_key", 1, False, self.no_api_key),
            ("disconnect_mid_stream", 3, False, self.disconnect_mid_stream),
            ("disconnect_while_waiting", 1, False, self.disconnect_while_waiting),
        ]
        self.total_weight = sum(w for _, w, _, _ in self.scenarios)
        self.oversize = b""

    async def prepare(self) -> None:
        """Build the oversize body once (its bytes, not a JSON document: the size check comes first)."""
        filler = "a" * (MAX_BODY_BYTES + 1024)
        self.oversize = json.dumps({"model": "soak", "prompt": filler, "max_tokens": 1}).encode()

    async def one(self, pick: float, rng: random.Random) -> Outcome:
        point = pick * self.total_weight
        for name, weight, valid, run in self.scenarios:
            point -= weight
            if point < 0:
                break
        start = time.monotonic()
        outcome = Outcome(name, valid, None, (), False, 0.0)
        try:
            await asyncio.wait_for(run(rng, outcome, start), self.deadline)
            outcome.ok = outcome.status in outcome.expected
            if not outcome.ok:
                outcome.problem_kind = "5xx" if outcome.status and outcome.status >= 500 else "status"
                outcome.problem = outcome.problem or f"status {outcome.status}, expected {outcome.expected}"
        except asyncio.TimeoutError:
            outcome.problem_kind, outcome.problem = "timeout", f"no complete answer within {self.deadline:.0f} s"
        except Checked as exc:
            outcome.problem_kind, outcome.problem = "body", str(exc)[:300]
        except httpx.HTTPError as exc:
            outcome.problem_kind, outcome.problem = "connection", f"{type(exc).__name__}: {exc}"[:300]
        outcome.total_s = round(time.monotonic() - start, 4)
        return outcome

    # ---- helpers ----------------------------------------------------------------------------------

    async def post_json(self, out: Outcome, path: str, body: dict | bytes, expected: tuple[int, ...],
                        headers: dict | None = None) -> dict:
        out.expected = expected
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self.client.post(path, content=content,
                                          headers={"Content-Type": "application/json", **(headers or {})})
        out.status = response.status_code
        try:
            data = response.json()
        except ValueError:
            raise Checked(f"{path} answered {response.status_code} with a body that is not JSON") from None
        if response.status_code >= 400 and not isinstance(data.get("error"), dict):
            raise Checked(f"{path} answered {response.status_code} without an OpenAI error object")
        return data

    async def stream(self, out: Outcome, path: str, body: dict, start: float, stop_after: int | None = None) -> int:
        """A streamed request: TTFT at the first chunk with text; returns the choice chunks seen. With
        `stop_after`, the client hangs up after that many chunks."""
        out.expected = (200,)
        chunks, done = 0, False
        async with self.client.stream("POST", path, json={**body, "stream": True}) as response:
            out.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                return 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise Checked(f"error event in the stream: {chunk['error']}")
                for choice in chunk.get("choices", []):
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text and out.ttft_s is None:
                        out.ttft_s = round(time.monotonic() - start, 4)
                    chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    return chunks  # leaving the block closes the connection mid-stream
        if not done:
            raise Checked("the stream ended without data: [DONE]")
        return chunks

    @staticmethod
    def check_choices(data: dict, count: int) -> None:
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) != count:
            raise Checked(f"expected {count} choices, got {choices!r:.200}")
        if any(c.get("finish_reason") not in ("stop", "length") for c in choices):
            raise Checked(f"unexpected finish reasons {[c.get('finish_reason') for c in choices]}")

    # ---- valid ------------------------------------------------------------------------------------

    async def chat(self, rng, out, start):
        self.check_choices(await self.post_json(out, "/v1/chat/completions", chat_body(rng), (200,)), 1)

    async def chat_stream(self, rng, out, start):
        body = chat_body(rng, stream_options={"include_usage": True})
        await self.stream(out, "/v1/chat/completions", body, start)

    async def completion_n_logprobs(self, rng, out, start):
        n = rng.randint(2, 4)
        data = await self.post_json(out, "/v1/completions", completion_body(rng, n=n, logprobs=2), (200,))
        self.check_choices(data, n)
        if any(not c.get("logprobs") for c in data["choices"]):
            raise Checked("a choice without logprobs")

    async def completion_stream_stop(self, rng, out, start):
        body = completion_body(rng, stop=rng.sample(STOPS, 3), include_stop_str_in_output=rng.random() < 0.5)
        await self.stream(out, "/v1/completions", body, start)

    async def chat_logprobs_stop_n(self, rng, out, start):
        body = chat_body(rng, n=2, logprobs=True, top_logprobs=3, stop=rng.sample(STOPS, 2))
        self.check_choices(await self.post_json(out, "/v1/chat/completions", body, (200,)), 2)

    async def completion_two_prompts(self, rng, out, start):
        body = completion_body(rng, prompt=rng.sample(PROMPTS, 2))
        self.check_choices(await self.post_json(out, "/v1/completions", body, (200,)), 2)

    async def tokenize(self, rng, out, start):
        data = await self.post_json(out, "/tokenize", {"prompt": rng.choice(PROMPTS)}, (200,))
        if not data.get("tokens"):
            raise Checked("/tokenize returned no tokens")

    # ---- invalid ----------------------------------------------------------------------------------

    async def bad_type(self, rng, out, start):
        wrong = rng.choice([{"max_tokens": "5"}, {"max_tokens": True}, {"stream": "yes"}, {"temperature": "hot"},
                            {"n": 1.5}, {"stop": 5}, {"logprobs": "2"}, {"seed": 0.5}])
        path, body = rng.choice([("/v1/chat/completions", chat_body(rng)), ("/v1/completions", completion_body(rng))])
        await self.post_json(out, path, {**body, **wrong}, (400,))

    async def non_finite(self, rng, out, start):
        field = rng.choice(["temperature", "top_p", "repetition_penalty", "presence_penalty", "min_p"])
        literal = rng.choice(["NaN", "Infinity", "-Infinity"])
        text = json.dumps(completion_body(rng))[:-1] + f', "{field}": {literal}}}'
        await self.post_json(out, "/v1/completions", raw(text), (400,))

    async def surrogate(self, rng, out, start):
        lone = rng.choice(["\\ud800", "\\udfff", "ok \\udc00 then"])
        path, text = rng.choice([
            ("/v1/completions", f'{{"model": "soak", "prompt": "{lone}", "max_tokens": 4}}'),
            ("/v1/chat/completions", f'{{"model": "soak", "messages": [{{"role": "user", "content": "{lone}"}}]}}'),
            ("/v1/completions", f'{{"model": "soak", "prompt": "hi", "stop": ["{lone}"]}}'),
            ("/tokenize", f'{{"prompt": "{lone}"}}'),
        ])
        await self.post_json(out, path, raw(text), (400,))

    async def oversize_body(self, rng, out, start):
        await self.post_json(out, "/v1/completions", self.oversize, (413,))

    async def oversize_prompt(self, rng, out, start):
        """Under the body limit, but far more characters than max_model_len tokens can hold."""
        body = completion_body(rng, prompt="word " * 600_000)
        await self.post_json(out, "/v1/completions", body, (400,))

    async def too_many_stops(self, rng, out, start):
        stops = [f"s{i}" for i in range(MAX_STOP_STRINGS + 1 + rng.randint(0, 1000))]
        if rng.random() < 0.3:
            stops = ["x" * 5000]  # one stop string over the length limit
        await self.post_json(out, "/v1/chat/completions", chat_body(rng, stop=stops), (400,))

    async def fan_out(self, rng, out, start):
        body = completion_body(rng, prompt=[rng.choice(PROMPTS)] * 4, n=MAX_SEQUENCES // 4 + 1)
        await self.post_json(out, "/v1/completions", body, (400,))

    async def unknown_fields(self, rng, out, start):
        """Unknown fields are kept and logged, not refused: clients send many optional extras."""
        body = chat_body(rng, frobnicate=True, tools_choice_extra={"x": 1})
        self.check_choices(await self.post_json(out, "/v1/chat/completions", body, (200,)), 1)

    async def bad_json(self, rng, out, start):
        text = rng.choice(['{"model": "soak", "prompt": ', "[1, 2", "not json", '{"prompt": "a"} trailing'])
        await self.post_json(out, "/v1/completions", raw(text), (400,))

    async def no_api_key(self, rng, out, start):
        await self.post_json(out, "/v1/completions", completion_body(rng), (401,), headers={"Authorization": ""})

    async def disconnect_mid_stream(self, rng, out, start):
        """The client hangs up after a few chunks of a long stream; the server must abort it (checked at the
        end: the engine idle with an empty KV cache)."""
        body = chat_body(rng, max_tokens=256, n=rng.choice([1, 2]))
        await self.stream(out, "/v1/chat/completions", body, start, stop_after=rng.randint(1, 4))
        out.ttft_s = None  # not a valid request's latency

    async def disconnect_while_waiting(self, rng, out, start):
        """The client gives up on a non-streamed request (n=2, two prompts) before its answer comes."""
        out.expected = (0, 200)
        body = completion_body(rng, prompt=rng.sample(PROMPTS, 2), n=2, max_tokens=128)
        try:
            response = await asyncio.wait_for(self.client.post("/v1/completions", json=body), rng.uniform(0.2, 2.0))
            out.status = response.status_code
        except asyncio.TimeoutError:
            out.status = 0
