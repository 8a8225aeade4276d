"""How KV block bytes travel from a prefill instance to a decode instance.

The decode instance opens one HTTP request per prompt to the prefill instance (POST /kv/prefill)
and reads back a stream of frames, one per block, as the prefill's chunks finish. A frame is 8
bytes, `<ii` (block index, slot), then:
- slot -1: the block's bytes follow inline in the stream ("http" transport);
- slot k >= 0: the bytes are in slot k of a shared-memory segment the decode instance created and
  named in its request ("shm" transport: both instances on one machine; the stream only says
  which slot is ready, and the decode instance copies straight from shared memory into its pool);
- index -1: the transfer is complete;
- index -2: it failed; slot is the length of a UTF-8 message that follows.

Shared memory is the default between instances on one machine and HTTP bodies across machines;
docs/router.md has the measured comparison.
"""

from __future__ import annotations

import struct
from multiprocessing import resource_tracker, shared_memory

import torch

FRAME = struct.Struct("<ii")
END, ERROR = -1, -2
INLINE = -1


def data_frame(index: int, slot: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(index, slot) + payload


def end_frame() -> bytes:
    return FRAME.pack(END, 0)


def error_frame(message: str) -> bytes:
    text = message.encode()
    return FRAME.pack(ERROR, len(text)) + text


class FrameReader:
    """Reads frames from an async iterator of byte chunks of any size."""

    def __init__(self, chunks) -> None:
        self._chunks = chunks.__aiter__()
        self._buffer = bytearray()

    async def read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            try:
                self._buffer += await self._chunks.__anext__()
            except StopAsyncIteration:
                raise ConnectionError(f"the KV stream ended {n - len(self._buffer)} bytes short of a frame") from None
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def frame(self, block_bytes: int) -> tuple[int, int, bytes]:
        """(index, slot, inline bytes); an error frame raises ConnectionError with its message."""
        index, slot = FRAME.unpack(await self.read(FRAME.size))
        if index == ERROR:
            raise ConnectionError((await self.read(slot)).decode(errors="replace"))
        payload = await self.read(block_bytes) if index >= 0 and slot == INLINE else b""
        return index, slot, payload


class SharedSlots:
    """A shared-memory segment of `num_slots` blocks: created by the decode side, attached by the prefill."""

    def __init__(self, block_bytes: int, num_slots: int = 0, name: str | None = None) -> None:
        self.block_bytes = block_bytes
        self.owner = name is None
        if self.owner:
            self.shm = shared_memory.SharedMemory(create=True, size=max(1, block_bytes * num_slots))
        else:
            self.shm = shared_memory.SharedMemory(name=name)
            # Attaching registers the segment with this process's resource tracker, which would unlink
            # it when this process exits; the creator owns it.
            resource_tracker.unregister(self.shm._name, "shared_memory")  # noqa: SLF001
        self.name = self.shm.name
        self._view = torch.frombuffer(self.shm.buf, dtype=torch.uint8)

    def slot(self, k: int) -> torch.Tensor:
        if (k + 1) * self.block_bytes > self._view.numel():
            raise ValueError(f"shared-memory slot {k} is outside the segment")
        return self._view[k * self.block_bytes:(k + 1) * self.block_bytes]

    def close(self) -> None:
        del self._view
        self.shm.close()
        if self.owner:
            self.shm.unlink()
