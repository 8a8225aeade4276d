"""The KV pool's pages mapped a chunk of blocks ahead of the steps that first write them
(fuselm/runner/kv_prefault.py): which pages the kernel holds (mincore), that contents survive, that every
block a step writes was mapped before the step, and that outputs equal an engine that leaves the faults to
the first writes."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import pytest
import torch

from fuselm import LLM, SamplingParams
from fuselm.runner import kv_prefault
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_WRITE) is Linux's")

PAGE = 4096


def resident_pages(tensor: torch.Tensor, start: int, end: int) -> list[bool]:
    """Whether each page under elements [start, end) of the tensor's first dimension is in memory (mincore)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    row = tensor.stride(0) * tensor.element_size()
    lo = tensor.data_ptr() + start * row
    hi = tensor.data_ptr() + end * row
    lo -= lo % PAGE
    hi += -hi % PAGE
    vec = (ctypes.c_ubyte * ((hi - lo) // PAGE))()
    assert libc.mincore(lo, hi - lo, vec) == 0, ctypes.get_errno()
    return [bool(v & 1) for v in vec]


def fresh_tensor(rows: int) -> torch.Tensor:
    """12 KB rows (like a block of a SmolLM2 layer's keys) on an anonymous mapping of its own, so that no page is
    resident yet (torch.empty may reuse freed heap memory)."""
    mapping = mmap.mmap(-1, rows * 16 * 3 * 64 * 4)
    t = torch.frombuffer(mapping, dtype=torch.float32).view(rows, 16, 3, 64)  # keeps the mapping alive
    assert not any(resident_pages(t, 0, rows)), "expected untouched pages from a fresh mapping"
    return t


def test_populate_maps_exactly_the_pages_asked_for():
    t = fresh_tensor(4096)  # 48 MB
    if not kv_prefault.populate(t, 100, 200):
        pytest.skip("the kernel refuses MADV_POPULATE_WRITE (older than Linux 5.14)")
    assert all(resident_pages(t, 100, 200))
    assert not any(resident_pages(t, 210, 4000))
    assert not any(resident_pages(t, 8, 99))


def test_populate_keeps_contents():
    t = fresh_tensor(4096)
    t[:300].copy_(torch.arange(300 * 16 * 3 * 64, dtype=torch.float32).view(300, 16, 3, 64))
    before = t[:300].clone()
    if not kv_prefault.populate(t, 0, 600):
        pytest.skip("the kernel refuses MADV_POPULATE_WRITE (older than Linux 5.14)")
    assert torch.equal(t[:300], before)
    assert all(resident_pages(t, 300, 600))


def test_cover_maps_whole_chunks_up_to_the_mark():
    tensors = [fresh_tensor(4096), fresh_tensor(4096)]
    pre = kv_prefault.KVPrefault(tensors, num_blocks=2000)
    if not pre.enabled or not kv_prefault.populate(tensors[0], 0, 0):
        pytest.skip("no madvise here")
    pre.chunk_blocks = 64
    pre.cover(10)
    assert pre.mapped == 64 and pre.calls == 1
    pre.cover(63)  # inside the mapped chunk: nothing to do
    assert pre.calls == 1
    pre.cover(200)
    assert pre.mapped == 256 and pre.calls == 2
    pre.cover(5000)  # past the pool (a null block id): up to the pool's end
    assert pre.mapped == 2000
    for t in tensors:
        assert all(resident_pages(t, 0, 256))
        assert not any(resident_pages(t, 2001, 2040))  # the null block and beyond: not asked for


def test_engine_maps_every_block_before_a_step_writes_it(tiny_llama):
    prompts = random_prompts([90, 3, 150, 40, 200, 17], seed=5)
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = LLM(tiny_llama[0], dtype="float32", device="cpu", max_num_batched_tokens=64)
    plain.engine.runner.kv_prefault.enabled = False
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]

    llm = LLM(tiny_llama[0], dtype="float32", device="cpu", max_num_batched_tokens=64)
    runner = llm.engine.runner
    pre = runner.kv_prefault
    if not pre.enabled:
        pytest.skip("no madvise here")
    pre.chunk_blocks = 4  # many chunks over this small run
    forward = runner._forward
    seen = []

    def checked(out):
        result = forward(out)
        written = max(b for r in out.scheduled for b in r.block_ids)
        seen.append((written, pre.mapped))
        return result

    runner._forward = checked
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert all(written < mapped for written, mapped in seen)
    assert pre.calls > 3 and pre.mapped % 4 == 0
    k = runner.attention_layers[0].k_cache
    assert all(resident_pages(k, 0, pre.mapped))
