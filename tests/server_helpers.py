"""A real uvicorn server on a free port in a background thread, shared by the server and bench tests."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

MODEL = "tiny-llama"


class ServerThread:
    """uvicorn serving `app` on a free port from a background thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def slow_down_steps(engine, seconds: float = 0.005):
    """Make each engine step take at least `seconds` (returns the undo): on the tiny model a step is a
    fraction of a millisecond, so without this a test's long request can finish before the test gets to
    disconnect it, and a flood can drain before the test sees it queued."""
    step = engine.engine.step

    def slow_step(*args, **kwargs):
        time.sleep(seconds)
        return step(*args, **kwargs)

    engine.engine.step = slow_step
    return lambda: setattr(engine.engine, "step", step)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    """One AsyncLLMEngine per test module on the tiny Llama (float32, CPU)."""
    from fuselm.engine.async_engine import AsyncLLMEngine

    eng = AsyncLLMEngine.from_options(tiny_llama[0], dtype="float32", device="cpu", log_stats_interval=0.5)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    from fuselm.server.app import build_app

    srv = ServerThread(build_app(engine, MODEL)).start()
    yield srv
    srv.stop()


def pool_is_full(engine) -> bool:
    """Every KV block back in the pool and nothing left queued or running."""
    e = engine.engine
    return e.kv.num_free_blocks == e.runner.num_blocks and not e.has_unfinished_requests()


class BackgroundStream:
    """Long streamed completions, one after another, from their own client and thread, recording when each
    event arrives; leaving the `with` block closes the current one (the server aborts it)."""

    def __init__(self, base_url: str, max_tokens: int = 900) -> None:
        self.base_url = base_url
        self.body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": max_tokens, "ignore_eos": True,
                     "stream": True}
        self.times: list[float] = []
        self.completed = 0  # streams that ran to their [DONE]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=60) as c:
            while not self._stop.is_set():
                with c.stream("POST", "/v1/completions", json=self.body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            self.times.append(time.monotonic())
                            self.completed += line == "data: [DONE]"
                        if self._stop.is_set():
                            return

    def __enter__(self) -> "BackgroundStream":
        self._thread.start()
        assert wait_until(lambda: len(self.times) >= 3, 30), "the background stream did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def events_after(self, moment: float) -> int:
        return sum(t > moment for t in self.times)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest wait for an event between `start` and `end` (monotonic times)."""
        inside = [start] + [t for t in self.times if start < t < end] + [end]
        return max(b - a for a, b in zip(inside, inside[1:]))
