"""How KV block bytes travel from a prefill instance to a decode instance.

The decode instance opens one HTTP request per prompt to the prefill instance (POST /kv/prefill)
and reads back a stream of frames, one per block, as the prefill's chunks finish. A frame is 8
bytes, `<ii` (block index, slot), then:
- slot -1: the block's bytes follow inline in the stream ("http" transport);
- slot k >= 0: the bytes are in slot k of a shared-memory segment the decode instance created and
  named in its request ("shm" transport: both instances on one machine; the stream only says
  which slot is ready, and the decode instance copies straight from shared memory into its pool).
  The segment lives as long as the decode instance and its pages are touched once when it is made:
  a fresh segment per transfer cost ~20 ms of page faults per 737 KB block on a loaded 2-vCPU VM,
  a touched one ~2 ms. Each transfer takes free slots from it (`SlotPool`), or the HTTP stream when
  too few are free; the prefill instance keeps its attachment to the segment (`attach`);
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

    @property
    def buffered(self) -> int:
        """Bytes already received and not yet read."""
        return len(self._buffer)

    async def line(self) -> bytes:
        """Bytes up to and including the next newline."""
        while b"\n" not in self._buffer:
            try:
                self._buffer += await self._chunks.__anext__()
            except StopAsyncIteration:
                raise ConnectionError("the KV stream ended inside its header") from None
        return await self.read(self._buffer.index(b"\n") + 1)

    async def frame(self, block_bytes: int) -> tuple[int, int, bytes]:
        """(index, slot, inline bytes); an error frame raises ConnectionError with its message."""
        index, slot = FRAME.unpack(await self.read(FRAME.size))
        if index == ERROR:
            raise ConnectionError((await self.read(slot)).decode(errors="replace"))
        payload = await self.read(block_bytes) if index >= 0 and slot == INLINE else b""
        return index, slot, payload


_created: set[str] = set()  # segments this process created (and its resource tracker unlinks if it dies)


class SharedSlots:
    """A shared-memory segment of `num_slots` blocks: created by the decode side, attached by the prefill."""

    def __init__(self, block_bytes: int, num_slots: int = 0, name: str | None = None) -> None:
        self.block_bytes = block_bytes
        self.owner = name is None
        if self.owner:
            self.shm = shared_memory.SharedMemory(create=True, size=max(1, block_bytes * num_slots))
            self.shm.buf[:] = bytes(len(self.shm.buf))  # touch every page now, not during transfers
            _created.add(self.shm.name)
        else:
            self.shm = shared_memory.SharedMemory(name=name)
            # Attaching registers the segment with this process's resource tracker, which would unlink
            # it when this process exits; the creator owns it. When the creator is this very process
            # (both instances in one process) the registration is the creator's own and stays: the
            # tracker keeps one per name, and dropping it would leave the segment behind after a crash.
            if self.shm.name not in _created:
                resource_tracker.unregister(self.shm._name, "shared_memory")  # noqa: SLF001
        self.name = self.shm.name
        self.num_slots = len(self.shm.buf) // block_bytes
        self.rows = torch.frombuffer(self.shm.buf, dtype=torch.uint8)[:self.num_slots * block_bytes].view(
            self.num_slots, block_bytes)  # slot k is row k

    def check(self, slots: list[int]) -> None:
        bad = [k for k in slots if not 0 <= k < self.num_slots]
        if bad:
            raise ValueError(f"shared-memory slots {bad[:5]} are outside the segment")

    def close(self) -> None:
        """Let go of the segment; its creator also removes its name, so the memory returns once every
        process has let go."""
        if self.owner:
            self.shm.unlink()
            _created.discard(self.name)
        del self.rows
        try:
            self.shm.close()
        except BufferError:  # a tensor still views the buffer: the mapping goes when that view does
            pass


class SlotPool:
    """The decode side's segment of `num_slots` block slots, handed out to transfers (event loop only).

    After a failed transfer the prefill instance may still write into that transfer's slots, so they
    are never handed out again: the segment is retired (closed once its last transfer ends) and the
    next transfer gets a fresh one.
    """

    def __init__(self, block_bytes: int, num_slots: int) -> None:
        self.block_bytes = block_bytes
        self.num_slots = num_slots
        self.segment: SharedSlots | None = None  # made at the first transfer
        self.free: list[int] = []
        self.users: dict[SharedSlots, int] = {}  # transfers in progress per segment, retired ones included

    def take(self, n: int) -> tuple[SharedSlots, list[int]] | None:
        if self.segment is None:
            if n > self.num_slots:
                return None
            self.segment, self.free = SharedSlots(self.block_bytes, self.num_slots), list(range(self.num_slots))
            self.users[self.segment] = 0
        if n > len(self.free):
            return None
        taken, self.free = self.free[:n], self.free[n:]
        self.users[self.segment] += 1
        return self.segment, taken

    def give(self, segment: SharedSlots, slots: list[int], clean: bool) -> None:
        if segment is self.segment:
            if clean:
                self.free.extend(slots)
            else:
                self.segment = None
        self.users[segment] -= 1
        if segment is not self.segment and self.users[segment] == 0:
            del self.users[segment]
            segment.close()

    def close(self) -> None:
        for segment in list(self.users):
            segment.close()
        self.users.clear()
        self.segment = None


_attached: dict[str, SharedSlots] = {}  # the prefill side's attachments, by segment name
MAX_ATTACHED = 8


def attach(name: str, block_bytes: int) -> SharedSlots:
    """The segment `name` (attached once, kept; the oldest of more than MAX_ATTACHED is let go)."""
    segment = _attached.pop(name, None) or SharedSlots(block_bytes, name=name)
    _attached[name] = segment
    while len(_attached) > MAX_ATTACHED:
        _attached.pop(next(iter(_attached))).close()
    return segment
