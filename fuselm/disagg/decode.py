"""The decode instance's side (`fuselm serve --disaggregation-mode decode`): receive a prompt's KV, then
generate as if it had been a prefix-cache hit.

The router sends a request here with the `x-fuselm-prefill-url` header naming a prefill instance.
Before the request is queued, `KVReceiver.fetch` (on the engine thread) looks the prompt's full
blocks up in this instance's prefix cache and takes a reference on each hit; for the rest it takes
fresh blocks from this instance's own pool. It asks the prefill instance for just the missing
blocks (POST /kv/prefill) and writes each one into its block as its frame arrives. Then, on the
engine thread, each received block is registered in the prefix cache under the prompt's own hash
chain, and the request is queued as usual: the scheduler finds the whole transferred prefix as a
prefix-cache hit and computes only the last partial block (at least one token, whose logits give
the first output token). Samples of n > 1 share those blocks as they share any prompt.
The references taken for the transfer are dropped once the request has been admitted.

Anything that goes wrong (the prefill instance unreachable or failing, a short stream, a layout
mismatch, a full pool) releases the blocks not received and the request computes the rest of its
prompt here: a failed transfer costs time, never output.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import json
import logging
import time
import urllib.parse

import httpx
import torch
from prometheus_client.core import GaugeMetricFamily

from fuselm.core.request import RequestStatus
from fuselm.disagg.blocks import BlockLayout, prompt_block_hashes
from fuselm.disagg.transport import FRAME, FrameReader, SlotPool
from fuselm.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger("fuselm")

PREFILL_HEADER = "x-fuselm-prefill-url"
PREFILL_URL: contextvars.ContextVar[str | None] = contextvars.ContextVar("fuselm_prefill_url", default=None)
TRANSPORTS = ("auto", "shm", "http")
SHM_BYTES = 256 << 20  # the shared-memory segment for transfers from prefill instances on this machine


def is_local(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PrefillHeaderMiddleware:
    """Pure ASGI: puts the request's prefill instance (its header) where DecodeEngine.add_request sees it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        url = None
        if scope["type"] == "http":
            url = dict(scope["headers"]).get(PREFILL_HEADER.encode())
        token = PREFILL_URL.set(url.decode() if url else None)
        try:
            await self.app(scope, receive, send)
        finally:
            PREFILL_URL.reset(token)


class KVReceiver:
    def __init__(self, engine: AsyncLLMEngine, transport: str = "auto", api_key: str | None = None) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown KV transfer transport {transport!r}; choose one of {', '.join(TRANSPORTS)}")
        self.engine = engine
        self.transport = transport
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # the prefill instance's key
        self.layout = BlockLayout(engine.engine.runner)
        self.slot_pool = SlotPool(self.layout.block_bytes, max(1, SHM_BYTES // self.layout.block_bytes))
        self.kv = engine.engine.kv
        self.client: httpx.AsyncClient | None = None
        self.pending: dict[str, list[int]] = {}  # request id -> blocks held until it is admitted (engine thread)
        self.bytes = self.blocks = self.transfers = self.fallbacks = self.skipped_blocks = 0
        self.seconds = 0.0
        engine.engine.step_hooks.append(lambda out: self.release_admitted())

    # ---- engine thread ----------------------------------------------------------------------

    def _plan(self, token_ids: list[int]) -> list[tuple[int, int, bool]]:
        """(block id, hash, needs data) per leading full block of the prompt, each block held by us."""
        pool = self.kv.pool
        plan = []
        for block_hash in prompt_block_hashes(self.kv, token_ids):
            block_id = pool.lookup(block_hash)
            if block_id is not None:
                pool.touch([block_id])
                plan.append((block_id, block_hash, False))
            elif pool.num_free > 0:
                plan.append((pool.allocate(1)[0], block_hash, True))
            else:
                break
        return plan

    def _settle(self, plan: list[tuple[int, int, bool]], received: set[int]) -> list[int]:
        """Register the received blocks up to the first gap; release the rest; return the blocks kept."""
        kept, dropped = [], []
        for index, (block_id, block_hash, needed) in enumerate(plan):
            if dropped or (needed and index not in received):
                dropped.append(block_id)
                continue
            if needed:
                self.kv.pool.register(block_id, block_hash)
            kept.append(block_id)
        if dropped:
            self.kv.pool.release(dropped)
        return kept

    def hold_until_admitted(self, request_id: str, blocks: list[int]) -> None:
        if blocks:
            self.pending[request_id] = blocks
        self.release_admitted()

    def release_admitted(self) -> None:
        groups = self.engine.engine.groups
        for request_id in list(self.pending):
            group = groups.get(request_id)
            if group is None or group[0].status is not RequestStatus.WAITING:
                self.kv.pool.release(self.pending.pop(request_id))

    # ---- event loop -------------------------------------------------------------------------

    async def fetch(self, prefill_url: str, token_ids: list[int]) -> list[int]:
        """Bring the prompt's missing blocks over from `prefill_url`; returns the blocks held for it."""
        start = time.monotonic()
        plan = await self.engine.call(lambda: self._plan(token_ids))
        needed = [i for i, (_, _, need) in enumerate(plan) if need]
        self.skipped_blocks += len(plan) - len(needed)
        received: set[int] = set()
        if needed:
            try:
                received = await self._receive(prefill_url.rstrip("/"), token_ids, plan, needed)
            except (httpx.HTTPError, ConnectionError, ValueError, OSError) as exc:
                self.fallbacks += 1
                logger.warning("KV transfer from %s failed (%s); computing the prompt here instead", prefill_url,
                               exc)
            self.transfers += 1
            self.seconds += time.monotonic() - start
        return await self.engine.call(lambda: self._settle(plan, received))

    async def _receive(self, url: str, token_ids: list[int], plan, needed: list[int]) -> set[int]:
        lease = None
        if self.transport == "shm" or (self.transport == "auto" and is_local(url)):
            lease = self.slot_pool.take(len(needed))  # None when too few slots are free: the HTTP stream then
        segment, slots = lease if lease is not None else (None, None)
        body = {"token_ids": token_ids, "blocks": needed, "layout": self.layout.describe(),
                "shm_name": segment.name if segment else None, "slots": slots}
        received: set[int] = set()
        complete = False
        try:
            if self.client is None:  # one client (and connection pool) for all transfers, on the event loop
                self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
            async with self.client.stream("POST", url + "/kv/prefill", json=body, headers=self.headers) as r:
                if r.status_code != 200:
                    raise ConnectionError(f"{url}/kv/prefill answered {r.status_code}: {(await r.aread())[:300]!r}")
                reader = FrameReader(r.aiter_bytes())
                header = await reader.line()
                if json.loads(header)["layout"] != self.layout.describe():
                    raise ValueError("the prefill instance's KV layout differs from this instance's")
                wanted = set(needed)
                batch: list[tuple[int, int, bytes]] = []  # frames read, blocks not yet written
                while not complete:
                    index, slot, payload = await reader.frame(self.layout.block_bytes)
                    if index < 0:
                        complete = True
                    elif index not in wanted:
                        raise ValueError(f"the prefill instance sent block {index}, which was not asked for")
                    else:
                        batch.append((index, slot, payload))
                    if batch and (complete or len(batch) >= 32 or reader.buffered < FRAME.size):
                        # what has arrived, in one copy per tensor, off the event loop (the blocks are ours alone)
                        await asyncio.to_thread(self._write, batch, plan, segment)
                        received.update(index for index, _, _ in batch)
                        batch = []
        finally:
            if segment is not None:
                self.slot_pool.give(segment, slots, clean=complete)
        return received

    def _write(self, batch: list[tuple[int, int, bytes]], plan, segment) -> None:
        block_ids = [plan[index][0] for index, _, _ in batch]
        if batch[0][1] >= 0:
            data = segment.rows.index_select(0, torch.tensor([slot for _, slot, _ in batch]))
        else:
            data = torch.frombuffer(bytearray(b"".join(p for _, _, p in batch)), dtype=torch.uint8)
            data = data.view(len(batch), self.layout.block_bytes)
        self.layout.write(block_ids, data)
        self.bytes += len(batch) * self.layout.block_bytes
        self.blocks += len(batch)

    def collect(self):
        """prometheus-client collector: the transfer totals, on this instance's /metrics."""
        for name, value, doc in (
                ("fuselm_kv_transfer_bytes", self.bytes, "KV bytes received from prefill instances since start"),
                ("fuselm_kv_transfer_blocks", self.blocks, "KV blocks received from prefill instances since start"),
                ("fuselm_kv_transfer_skipped_blocks", self.skipped_blocks, "Prompt blocks not transferred because "
                 "this instance's prefix cache held them"),
                ("fuselm_kv_transfer_seconds", self.seconds, "Seconds spent receiving KV (request to last block, "
                 "summed over transfers)"),
                ("fuselm_kv_transfers", self.transfers, "KV transfers attempted since start"),
                ("fuselm_kv_transfer_fallbacks", self.fallbacks, "Transfers that failed, so the prompt was computed "
                 "here")):
            yield GaugeMetricFamily(name, doc, value=value)


class DecodeEngine(AsyncLLMEngine):
    """An AsyncLLMEngine whose requests first receive their prompt's KV from the prefill instance named
    by the request's header (no header: an ordinary request)."""

    receiver: KVReceiver | None = None

    async def add_request(self, request_id, prompt, params, priority=0, arrival_time=None, final_only=False,
                          client_id=""):
        url = PREFILL_URL.get()
        if url is None or self.receiver is None or not self.is_running:
            return await super().add_request(request_id, prompt, params, priority, arrival_time, final_only, client_id)
        arrival_time = arrival_time or time.time()
        token_ids = prompt if isinstance(prompt, list) else None
        if isinstance(prompt, str) and prompt:
            try:
                token_ids = await self.encode(prompt)
            except (TypeError, ValueError):
                token_ids = None  # the engine's own check will say what is wrong with it
        held: list[int] = []
        if token_ids and all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids) \
                and len(token_ids) < self.max_model_len:
            held = await self.receiver.fetch(url, token_ids)
        try:
            stream = await super().add_request(request_id, prompt, params, priority, arrival_time, final_only,
                                               client_id)
        finally:
            receiver = self.receiver
            self.call_soon(lambda: receiver.hold_until_admitted(request_id, held))
        return stream

    def shutdown(self, timeout: float = 10.0) -> None:
        super().shutdown(timeout)
        if self.receiver is not None:  # the transfer segment would otherwise outlive the process in /dev/shm
            self.receiver.slot_pool.close()
