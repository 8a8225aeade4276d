"""How the router picks a replica for a request: prefix (cache-aware), round_robin, least_load.

A replica's load is the number of requests the router has in flight on it: it changes the moment
a request is sent or finishes, unlike the queue lengths a health check scrapes every second.

`prefix` follows SGLang's cache-aware router: while the replicas are balanced, a request goes to
the replica whose radix tree (router/radix.py: the prompts recently routed there) shares the
longest prefix with its prompt, provided that prefix is at least `match_threshold` of the prompt;
otherwise to the least loaded replica, whose tree then learns the prompt. The replicas count as
imbalanced when the busiest has more than `balance_abs` requests over the idlest and more than
`balance_rel` times as many; then every request goes to the least loaded one, so one hot prefix
cannot pile its whole group onto a single replica while the others idle.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from fuselm.router.health import Instance
from fuselm.router.radix import RadixTree

POLICIES = ("prefix", "round_robin", "least_load")


class Replica(Instance):
    """One --worker: its address and health (Instance), the load the router knows of, its radix tree."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.in_flight = 0  # requests the router has sent and not yet seen finish
        self.routed = 0  # requests sent since start
        self.failures = 0  # requests that failed because the instance did not answer
        self.tree = RadixTree()


@dataclass
class PrefixSettings:
    match_threshold: float = 0.5  # shortest shared prefix, as a share of the prompt, that earns routing by cache
    balance_abs: int = 4  # imbalanced when the busiest replica has this many more requests than the idlest ...
    balance_rel: float = 1.5  # ... and this many times as many


class Router:
    """Picks a healthy replica per request under one policy (called on the event loop only)."""

    def __init__(self, replicas: list[Replica], policy: str, settings: PrefixSettings | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.replicas = replicas
        self.policy = policy
        self.settings = settings or PrefixSettings()
        self._turn = itertools.count()
        self.cache_routed = 0  # prefix policy: requests sent to the replica with the longest match

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def choose(self, prompt_text: str) -> Replica | None:
        """The replica for a request whose prompt reads `prompt_text`; None when none is healthy."""
        candidates = self.healthy()
        if not candidates:
            return None
        if self.policy == "round_robin":
            return candidates[next(self._turn) % len(candidates)]
        least = min(candidates, key=lambda r: (r.in_flight, r.routed))
        if self.policy == "least_load":
            return least
        return self._by_prefix(candidates, least, prompt_text)

    def _by_prefix(self, candidates: list[Replica], least: Replica, text: str) -> Replica:
        s = self.settings
        busiest = max(r.in_flight for r in candidates)
        imbalanced = busiest - least.in_flight > s.balance_abs and busiest > s.balance_rel * least.in_flight
        chosen = least
        if not imbalanced and text:
            matches = [(r.tree.match(text), -r.in_flight, r) for r in candidates]
            length, _, best = max(matches, key=lambda m: (m[0], m[1]))
            if length >= s.match_threshold * len(text):
                chosen = best
                self.cache_routed += 1
        chosen.tree.insert(text)
        return chosen
