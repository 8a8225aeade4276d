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
