"""Fairness between clients over a real socket: a flooding client cannot make a well-behaved one wait
behind its backlog, and with `max_num_seqs_per_client` it cannot hold every seat while the other is
present. Clients are told apart by the X-Client-Id header, the user field, the peer, or one of
several API keys (server/clients.py).

The checks count what happened in between rather than milliseconds (the cores are shared): how
many of the flood's requests the scheduler finished between the well-behaved request's arrival and
its first scheduling (before per-client fair admission: all of them, the whole backlog), and how many
seats the flooder held while the well-behaved client was there. The count is taken inside the
scheduler: a finished flood response can reach the test's HTTP thread many steps later on busy cores.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from starlette.requests import Request

from fuselm.server.app import build_app
from fuselm.server.clients import API_KEY_INDEX, client_identity
from server_helpers import MODEL, ServerThread, pool_is_full, slow_down_steps, wait_until

SEATS = 4
FLOOD = 24  # the flooder's requests: SEATS running, the rest waiting
FLOOD_TOKENS = 48


def make_engine(tiny_llama, **options):
    from fuselm.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_options(tiny_llama[0], dtype="float32", device="cpu", max_num_seqs=SEATS,
                                         log_stats_interval=0, **options)
    slow_down_steps(engine)  # a flood that drains in milliseconds cannot be seen queued
    return engine


class Flood:
    """FLOOD non-streaming completions from the client 'flooder', sent at once from their own threads;
    records when each finished. Leaving the `with` block disconnects the ones still going."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self.finished: list[float] = []
        self.body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": FLOOD_TOKENS, "ignore_eos": True}
        self.client = httpx.Client(base_url=base_url, timeout=120, headers=headers,
                                   limits=httpx.Limits(max_connections=FLOOD))
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(FLOOD)]

    def _one(self) -> None:
        try:
            if self.client.post("/v1/completions", json=self.body).status_code == 200:
                self.finished.append(time.monotonic())
        except httpx.HTTPError:  # closed when the test is done with it
            pass

    def __enter__(self) -> "Flood":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()  # the server aborts what is left of the flood
        for t in self.threads:
            t.join(120)


def first_token_time(base_url: str, headers: dict[str, str], user: str | None = None) -> float:
    """Send one streamed 2-token completion; the monotonic time its first token arrived."""
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 2, "ignore_eos": True, "stream": True}
    if user is not None:
        body["user"] = user
    first = None
    with httpx.Client(base_url=base_url, timeout=120, headers=headers) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.monotonic()
    assert first is not None
    return first


class SchedulerLog:
    """What the engine's scheduler did, in order, seen from inside: which client's request arrived,
    was first scheduled, or finished. Counting the flood's finishes between a request's arrival and
    its first scheduling is free of the lag between the engine and the test's HTTP threads (on 2
    busy cores a finished flood response can reach its thread many steps later)."""

    def __init__(self, engine) -> None:
        self.events: list[tuple[str, str, int]] = []  # (what, client, seq_id)
        scheduler = engine.engine.scheduler
        add, finish, schedule = scheduler.add_request, scheduler.finish_request, scheduler.schedule
        seen: set[int] = set()

        def logged_add(request):
            self.events.append(("arrive", request.client_id, request.seq_id))
            return add(request)

        def logged_finish(request, reason):
            if not request.is_finished:
                self.events.append(("finish", request.client_id, request.seq_id))
            return finish(request, reason)

        def logged_schedule():
            out = schedule()
            for row in out.scheduled:
                if row.seq_id not in seen:
                    seen.add(row.seq_id)
                    self.events.append(("scheduled", scheduler._unfinished[row.seq_id].client_id, row.seq_id))
            return out

        self._scheduler, self._originals = scheduler, (add, finish, schedule)
        scheduler.add_request, scheduler.finish_request, scheduler.schedule = logged_add, logged_finish, logged_schedule

    def __enter__(self) -> "SchedulerLog":
        return self

    def __exit__(self, *exc) -> None:  # the engine's own methods back (a module's engine serves later tests)
        s = self._scheduler
        s.add_request, s.finish_request, s.schedule = self._originals

    def waits(self, client: str, other: str) -> list[int]:
        """For each of `client`'s requests, how many of `other`'s requests finished between its arrival
        and its first scheduling."""
        arrived: dict[int, int] = {}
        waits = []
        for i, (what, who, seq_id) in enumerate(list(self.events)):
            if who != client:
                continue
            if what == "arrive":
                arrived[seq_id] = i
            elif what == "scheduled" and seq_id in arrived:
                waits.append(sum(w == "finish" and c == other for w, c, _ in self.events[arrived[seq_id]:i]))
        return waits


def running_of(engine, client: str) -> int:
    return sum(r.client_id == client for r in list(engine.engine.scheduler.running))


@pytest.fixture(scope="module")
def fair_server(tiny_llama):
    engine = make_engine(tiny_llama)
    srv = ServerThread(build_app(engine, MODEL)).start()
    yield srv, engine
    srv.stop()
    engine.shutdown()


@pytest.mark.parametrize("identify", ["header", "user"])
def test_a_newcomer_does_not_wait_behind_a_floods_backlog(fair_server, identify):
    srv, engine = fair_server
    flooder = {"X-Client-Id": "flooder"}
    with Flood(srv.base_url, flooder) as flood:
        assert wait_until(lambda: engine.engine.num_running == SEATS and engine.engine.num_waiting >= FLOOD - SEATS
                          - 2, 30), "the flood did not fill the engine"
        with SchedulerLog(engine) as log:
            if identify == "header":
                first_token_time(srv.base_url, {"X-Client-Id": "newcomer"})
            else:  # the OpenAI `user` field (the flood's requests have none: their header names them)
                first_token_time(srv.base_url, {}, user="newcomer")
        waits = log.waits("id:newcomer" if identify == "header" else "user:newcomer", "id:flooder")
        assert len(waits) == 1, f"the scheduler saw {len(waits)} newcomer requests"
        # One wave of the flood's running requests may finish first (the seats must free up); the rest of
        # its backlog, FLOOD - SEATS more requests, must not be served before the newcomer.
        assert waits[0] <= 2 * SEATS, f"{waits[0]} of the flood's {FLOOD} requests finished before the newcomer ran"
    assert wait_until(lambda: pool_is_full(engine), 30)


def test_the_per_client_cap_keeps_seats_for_a_present_client(tiny_llama):
    cap = 2
    engine = make_engine(tiny_llama, max_num_seqs_per_client=cap)
    srv = ServerThread(build_app(engine, MODEL)).start()
    try:
        with Flood(srv.base_url, {"X-Client-Id": "flooder"}) as flood:
            # alone, the flooder may use every seat (waited for: the flood's requests arrive over several steps)
            assert wait_until(lambda: engine.engine.num_waiting >= FLOOD - SEATS - 2
                              and running_of(engine, "id:flooder") == SEATS, 30), "the flooder never held every seat"
            # The cap never preempts: the flooder keeps the seats it took while alone until those requests
            # finish, and admits no more meanwhile, while the steady client keeps coming back.
            deadline = time.monotonic() + 40
            while running_of(engine, "id:flooder") > cap:
                assert time.monotonic() < deadline, "the flooder kept more seats than the cap"
                first_token_time(srv.base_url, {"X-Client-Id": "steady"})
            seats_held = []
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.is_set():
                    seats_held.append(running_of(engine, "id:flooder"))
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            with SchedulerLog(engine) as log:
                for _ in range(3):  # one request after another: present all along
                    first_token_time(srv.base_url, {"X-Client-Id": "steady"})
            sampling.set()
            sampler.join()
            waits = log.waits("id:steady", "id:flooder")
            assert len(waits) == 3, f"the scheduler saw {len(waits)} of the steady client's 3 requests"
            assert max(seats_held) <= cap, f"the flooder held {max(seats_held)} seats while another client was there"
            assert max(waits) <= cap, f"the steady client waited for {waits} of the flood's requests to finish"
            assert len(flood.finished) < FLOOD  # the flood was still going on throughout
    finally:
        srv.stop()
        assert wait_until(lambda: pool_is_full(engine), 30)
        engine.shutdown()


def test_several_api_keys_each_are_a_client(tiny_llama):
    engine = make_engine(tiny_llama)
    srv = ServerThread(build_app(engine, MODEL, api_key=["key-a", "key-b"])).start()
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        for key, status in (("key-a", 200), ("key-b", 200), ("key-c", 401)):
            r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=60,
                           headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == status, (key, r.text)
    finally:
        srv.stop()
        engine.shutdown()


def _request(headers: dict[str, str], scope_extra: dict | None = None, peer: str = "10.0.0.7") -> Request:
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "client": (peer, 5555),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()], **(scope_extra or {})}
    return Request(scope)


def test_client_identity_order():
    keyed = {API_KEY_INDEX: 1}
    assert client_identity(_request({"X-Client-Id": "x"}, keyed), "u") == "key:1"  # a key beats what a client says
    assert client_identity(_request({"X-Client-Id": "x"}), "u") == "id:x"
    assert client_identity(_request({}), "u") == "user:u"
    assert client_identity(_request({}), None) == "addr:10.0.0.7"  # the host, whatever the connection's port
    assert client_identity(_request({"X-Client-Id": "key:1"}), None) != "key:1"  # a header cannot pose as a key
    assert len(client_identity(_request({"X-Client-Id": "x" * 10_000}), None)) < 200
