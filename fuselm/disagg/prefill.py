"""The prefill instance's side (`fuselm serve --disaggregation-mode prefill`): POST /kv/prefill.

A decode instance posts a prompt's token ids, the indices of the full blocks it still needs (it
skips those its own prefix cache holds) and, for the shared-memory transport, the name of a
segment with one slot per needed block. The prompt is queued here as a prompt-only request
(max_tokens 0: computed, nothing sampled), chunked like any prompt. After every engine step the
exporter (an LLMEngine step hook, on the engine thread, before any request of the step finishes)
copies each needed block that the step completed, out of the KV pool into its slot or into a
buffer for the HTTP stream, and the stream sends its frame right away: blocks travel while later
chunks are still being computed.

The blocks themselves stay this instance's: the request frees them when its prompt is done, as
any finished request does. When the decode side goes away mid-transfer, the stream's end aborts
the request, so its blocks return to the pool too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging

import torch
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from fuselm.disagg.blocks import BlockLayout
from fuselm.disagg.transport import INLINE, SharedSlots, attach, data_frame, end_frame, error_frame
from fuselm.engine.async_engine import AsyncLLMEngine
from fuselm.errors import InvalidRequestError
from fuselm.sampling_params import SamplingParams

logger = logging.getLogger("fuselm")
_ids = itertools.count()


class PrefillRequest(BaseModel):
    token_ids: list[int]
    blocks: list[int]  # indices of the prompt's full blocks to send, ascending
    layout: dict  # the decode side's BlockLayout.describe(): must equal ours
    shm_name: str | None = None  # the decode side's shared-memory segment, or None: bytes inline in the stream
    slots: list[int] | None = None  # with shm_name: the segment's slot for each entry of `blocks`


class _Export:
    """One prompt being exported; `push` is called on the engine thread."""

    def __init__(self, blocks: list[int], slots: list[int], segment: SharedSlots | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.slot_of = dict(zip(blocks, slots))
        self.limit = max(blocks) + 1 if blocks else 0
        self.next_block = 0
        self.segment = segment
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class KVExporter:
    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        self.layout = BlockLayout(engine.engine.runner)
        self.block_size = engine.engine.config.block_size
        self.exports: dict[str, _Export] = {}
        self.bytes_sent = 0
        engine.engine.step_hooks.append(self.after_step)

    def after_step(self, out) -> None:
        """Engine thread: copy out every needed block the step completed."""
        for row in out.scheduled:
            export = self.exports.get(row.request_id)
            if export is None:
                continue
            full = min((row.num_computed_tokens + row.num_new_tokens) // self.block_size, export.limit)
            ready = [(index, export.slot_of[index]) for index in range(export.next_block, full)
                     if index in export.slot_of]
            export.next_block = max(export.next_block, full)
            if not ready:
                continue
            block_ids = [row.block_ids[index] for index, _ in ready]
            if export.segment is not None:
                self.layout.read(block_ids, export.segment.rows, [slot for _, slot in ready])
                for index, slot in ready:
                    export.push((index, slot, b""))
            else:
                buffer = torch.empty(len(ready), self.layout.block_bytes, dtype=torch.uint8)
                self.layout.read(block_ids, buffer)
                for (index, slot), data in zip(ready, buffer.numpy()):
                    export.push((index, slot, data.tobytes()))
            self.bytes_sent += len(ready) * self.layout.block_bytes

    def _drop(self, request_id: str) -> None:
        """Engine thread: forget an export (no step writes into its slots after this)."""
        self.exports.pop(request_id, None)

    async def stream(self, body: PrefillRequest):
        if body.layout != self.layout.describe():
            raise InvalidRequestError("the decode instance's KV layout differs from this prefill instance's (same "
                                      "model, KV dtype and block size needed)", param="layout")
        limit = (len(body.token_ids) - 1) // self.block_size
        if body.blocks != sorted(set(body.blocks)) or any(not 0 <= b < limit for b in body.blocks):
            raise InvalidRequestError(f"blocks must be ascending indices below {limit}", param="blocks")
        segment, slots = None, [INLINE] * len(body.blocks)
        if body.shm_name:
            if body.slots is None or len(body.slots) != len(body.blocks):
                raise InvalidRequestError("slots must name one shared-memory slot per block", param="slots")
            try:
                segment, slots = attach(body.shm_name, self.layout.block_bytes), body.slots
                segment.check(slots)
            except (OSError, ValueError) as exc:
                raise InvalidRequestError(f"cannot use shared-memory segment {body.shm_name!r}: {exc}",
                                          param="shm_name") from None
        request_id = f"kv-prefill-{next(_ids)}"
        export = _Export(body.blocks, slots, segment, asyncio.get_running_loop())
        self.exports[request_id] = export
        try:
            stream = await self.engine.add_request(request_id, body.token_ids, SamplingParams(max_tokens=0),
                                                   final_only=True)
        except BaseException:
            self.engine.call_soon(lambda: self._drop(request_id))
            raise

        async def finish() -> None:
            try:
                async for _ in stream:
                    pass
                export.queue.put_nowait(None)
            except Exception as exc:  # the request failed on this side
                export.queue.put_nowait(exc)

        waiter = asyncio.ensure_future(finish())

        async def frames():
            header = {"layout": self.layout.describe(), "blocks": len(body.blocks)}
            sent = 0
            try:
                yield (json.dumps(header) + "\n").encode()
                while sent < len(body.blocks):
                    item = await export.queue.get()
                    if item is None or isinstance(item, Exception):
                        message = str(item) if item is not None else "the prompt finished before all its blocks"
                        yield error_frame(f"prefill failed: {message}")
                        return
                    index, slot, payload = item
                    yield data_frame(index, slot, payload)
                    sent += 1
                yield end_frame()
            finally:
                waiter.cancel()
                stream.abort()  # a no-op once the prompt is done; otherwise its blocks go back now
                self.engine.call_soon(lambda: self._drop(request_id))

        return StreamingResponse(frames(), media_type="application/octet-stream")


def prefill_routes(exporter: KVExporter) -> APIRouter:
    routes = APIRouter()

    @routes.post("/kv/prefill")
    async def kv_prefill(body: PrefillRequest):
        return await exporter.stream(body)

    return routes
