"""Health checks of the router's instances: /health for liveness, /metrics for their load.

Every `interval` seconds each instance's /health is asked (within `timeout`); after `failures`
misses in a row the instance is taken out of routing and every request in flight on it is failed
at once with a clear error (the `down` event the proxy waits on), so a replica that hangs cannot
hang its clients. It is put back after its first answered check. The same pass scrapes the
instance's /metrics for the gauges the router's status and /metrics show (queue lengths, KV use,
prefix-cache hit rate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger("fuselm")

# The instance's gauges the router keeps (its /metrics name -> the router's key for it).
SCRAPED = {
    "fuselm_num_requests_running": "running",
    "fuselm_num_requests_waiting": "waiting",
    "fuselm_kv_cache_usage_ratio": "kv_usage",
    "fuselm_prefix_cache_hit_rate": "prefix_hit_rate",
    "fuselm_kv_transfer_bytes": "kv_transfer_bytes",  # decode instances of disaggregated serving
    "fuselm_kv_transfer_blocks": "kv_transfer_blocks",
    "fuselm_kv_transfer_seconds": "kv_transfer_seconds",
    "fuselm_kv_transfer_fallbacks": "kv_transfer_fallbacks",
}


class Instance:
    """What the health checker keeps per instance: up or down, an event fired when it goes down."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.healthy = True
        self.misses = 0
        self.stats: dict[str, float] = {}
        self.down = asyncio.Event()  # set while the instance is out of routing

    def mark_down(self, reason: str) -> None:
        if self.healthy:
            logger.warning("instance %s taken out of routing: %s", self.url, reason)
        self.healthy = False
        self.down.set()

    def mark_up(self) -> None:
        self.misses = 0
        if not self.healthy:
            logger.info("instance %s is healthy again", self.url)
            self.healthy = True
            self.down = asyncio.Event()


def parse_gauges(text: str) -> dict[str, float]:
    stats: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        key = SCRAPED.get(family.name)
        if key is not None and family.samples:
            stats[key] = sum(s.value for s in family.samples)
    return stats


class HealthChecker:
    def __init__(self, instances: list[Instance], client: httpx.AsyncClient, interval: float = 1.0,
                 timeout: float = 5.0, failures: int = 2) -> None:
        self.instances = instances
        self.client = client
        self.interval = interval
        self.timeout = timeout
        self.failures = failures
        self._task: asyncio.Task | None = None

    async def check(self, inst: Instance) -> None:
        try:
            r = await self.client.get(inst.url + "/health", timeout=self.timeout)
            ok = r.status_code == 200
            reason = f"/health answered {r.status_code}"
        except httpx.HTTPError as exc:
            ok, reason = False, f"/health failed: {type(exc).__name__}"
        if not ok:
            inst.misses += 1
            if inst.misses >= self.failures or not inst.healthy:
                inst.mark_down(reason)
            return
        inst.mark_up()
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = await self.client.get(inst.url + "/metrics", timeout=self.timeout)
            if r.status_code == 200:
                inst.stats.update(parse_gauges(r.text))

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(inst) for inst in self.instances))

    async def _loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
