"""AsyncLLMEngine.from_options: the engine thread loads the model it steps, and a failed load is the caller's error.

Why it matters: libgomp parks its workers after every parallel region once the threads that have
started regions (and their teams) outnumber the CPUs, so a model loaded on one thread and stepped
on another ran prefill ~1.8x slower on 2 vCPUs (fuselm/engine/async_engine.py).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from fuselm.engine.async_engine import AsyncLLMEngine
from fuselm.engine.engine import LLMEngine
from fuselm.sampling_params import SamplingParams


def test_from_options_loads_and_steps_on_the_engine_thread(tiny_llama, monkeypatch):
    threads: dict[str, set[str]] = {"load": set(), "step": set()}
    real_init, real_step = LLMEngine.__init__, LLMEngine.step

    def init(self, config):
        threads["load"].add(threading.current_thread().name)
        real_init(self, config)

    def step(self):
        threads["step"].add(threading.current_thread().name)
        return real_step(self)

    monkeypatch.setattr(LLMEngine, "__init__", init)
    monkeypatch.setattr(LLMEngine, "step", step)
    eng = AsyncLLMEngine.from_options(tiny_llama[0], dtype="float32", device="cpu")
    try:
        assert eng.is_running

        async def run() -> list[int]:
            out = None
            async for out in eng.generate("r0", [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=4)):
                pass
            return list(out.outputs[0].token_ids)

        tokens = asyncio.run(run())
    finally:
        eng.shutdown()
    assert len(tokens) == 4
    assert threads["load"] == {"fuselm-engine"} and threads["step"] == {"fuselm-engine"}
    assert threading.current_thread().name not in threads["load"]


def test_from_options_raises_the_load_error(tmp_path):
    bad = tmp_path / "bad.gguf"  # exists, so the failure comes from the load on the engine thread
    bad.write_bytes(b"not a gguf file" * 8)
    with pytest.raises(ValueError, match="GGUF magic"):
        AsyncLLMEngine.from_options(str(bad), dtype="float32", device="cpu")
    for t in threading.enumerate():  # the engine thread ends right after handing over the error
        if t.name == "fuselm-engine":
            t.join(5.0)
            assert not t.is_alive()
