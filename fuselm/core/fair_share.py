"""Per-client fair admission: one virtual token counter per client, so that one client's backlog
cannot keep another client's requests waiting.

The scheme is the virtual token counter of Sheng et al., "Fairness in Serving Large Language
Models" (OSDI 2024). A client's counter is the number of tokens the engine scheduled for it:
prompt tokens when a request is admitted (charged at once, so two backlogged clients alternate
within one step), then every decode and speculative token. Among waiting requests of equal
priority the scheduler admits from the client with the lowest counter; within one client the
order stays (priority, arrival). All tokens weigh the same (one prompt token = one generated
token), so a counter is attained service in tokens.

A client that had nothing waiting or running starts at the lowest counter among the clients that
do: idling banks no credit, and a client does not stay behind for service it got earlier. When no
client has anything left, every counter is forgotten. With a single client the counters never
change the order, which stays plain (priority, arrival).

For the scheduler's per-client cap (`max_num_seqs_per_client`), a client counts as present while
it has sequences and for `presence_seconds` after its last one finished: a client that sends its
requests one after another is present all along, so the seats the cap keeps free stay free for
it between two of its requests.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Iterator, Protocol


class _Queued(Protocol):
    client_id: str
    priority: int
    arrival_seq: int


class FairShare:
    """Counters of the clients with waiting or running sequences (and of recent ones above the floor)."""

    def __init__(self, presence_seconds: float = 1.0) -> None:
        self.service: dict[str, int] = {}  # client -> tokens scheduled for it
        self.unfinished: Counter[str] = Counter()  # client -> its waiting + running sequences (only > 0)
        self.presence_seconds = presence_seconds
        self.left_at: dict[str, float] = {}  # client -> when its last sequence finished (monotonic), while recent

    @property
    def num_active_clients(self) -> int:
        return len(self.unfinished)

    def arrive(self, client: str) -> None:
        """A new sequence of `client` joins the queue (not a preempted one: it never left)."""
        if client not in self.unfinished:
            floor = min((self.service[c] for c in self.unfinished), default=0)
            self.service[client] = max(self.service.get(client, 0), floor)
            self.left_at.pop(client, None)
        self.unfinished[client] += 1

    def leave(self, client: str) -> None:
        """A sequence of `client` finished (or was aborted)."""
        self.unfinished[client] -= 1
        if self.unfinished[client] > 0:
            return
        del self.unfinished[client]
        self.left_at[client] = time.monotonic()
        if not self.unfinished:
            self.service.clear()
        elif len(self.service) > 2 * len(self.unfinished) + 64:  # forget idle clients a return would lift anyway
            floor = min(self.service[c] for c in self.unfinished)
            self.service = {c: s for c, s in self.service.items() if c in self.unfinished or s > floor}

    def others_present(self, client: str) -> bool:
        """Whether a client other than `client` has sequences or finished its last one moments ago."""
        if len(self.unfinished) > 1 or (self.unfinished and client not in self.unfinished):
            return True
        horizon = time.monotonic() - self.presence_seconds
        self.left_at = {c: t for c, t in self.left_at.items() if t > horizon}
        return any(c != client for c in self.left_at)

    def charge(self, client: str, tokens: int) -> None:
        self.service[client] += tokens

    def order(self, waiting: list[_Queued], blocked: set[str]) -> Iterator[_Queued]:
        """`waiting` (sorted by (priority, arrival)) in admission order, read lazily so that charges made
        between items count: the head of the client with the lowest (priority, counter, arrival) first.
        Clients added to `blocked` meanwhile are passed over."""
        if self.num_active_clients <= 1:  # one client: the queue's own order
            for req in list(waiting):
                if req.client_id not in blocked:
                    yield req
            return
        queues: dict[str, list[_Queued]] = {}
        for req in waiting:  # each client's requests, still in (priority, arrival) order
            queues.setdefault(req.client_id, []).append(req)
        heads = {client: 0 for client in queues}
        while heads:
            for client in blocked & heads.keys():
                del heads[client]
            if not heads:
                return

            def rank(client: str) -> tuple[int, int, int]:
                head = queues[client][heads[client]]
                return head.priority, self.service[client], head.arrival_seq

            client = min(heads, key=rank)
            yield queues[client][heads[client]]
            heads[client] += 1
            if heads[client] == len(queues[client]):
                del heads[client]
