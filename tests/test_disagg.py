"""Disaggregated prefill/decode over real servers on 127.0.0.1: router + prefill + decode give the single
instance's greedy output token for token (long prompts, chunked prefill, n > 1, both transports); a
failed transfer falls back to computing the prompt on the decode side; a killed decode instance gives
the client a clear error and leaves the prefill instance's pool full."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import random_prompts
from server_helpers import MODEL, ServerThread, pool_is_full, wait_until

REPO = Path(__file__).resolve().parent.parent


def start_instance(path: str, mode: str | None, api_key: str | None = None, **options):
    from fuselm.disagg.serve import enable_disaggregation, engine_class
    from fuselm.server.app import build_app

    engine = engine_class(mode).from_options(path, dtype="float32", device="cpu", log_stats_interval=60,
                                             log_requests=False, **options)
    app = build_app(engine, MODEL, api_key=api_key)
    if mode:
        enable_disaggregation(app, engine, mode, api_key=api_key)
    return ServerThread(app).start(), engine


def start_router(prefill: str, decode: str) -> ServerThread:
    from fuselm.router.app import build_router_app

    # A generous health timeout: a loaded CI machine must not take a busy instance for a dead one.
    return ServerThread(build_router_app(prefill=[prefill], decode=[decode], health_interval=0.2,
                                         health_timeout=10.0)).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def decode_process(tiny_llama):
    """A decode instance in its own process (to be killed), started first so it loads while the rest run."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", "from fuselm.cli import main; main()", "serve", "--model",
                                tiny_llama[0], "--dtype", "float32", "--port", str(port), "--disaggregation-mode",
                                "decode", "--served-model-name", MODEL, "--num-threads", "1"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield process, f"http://127.0.0.1:{port}"
    process.kill()
    process.wait(10)


@pytest.fixture(scope="module")
def instances(tiny_llama, decode_process):
    """(single, prefill, decode) servers and engines; the prefill instance chunks prompts by 32 tokens."""
    started = [start_instance(tiny_llama[0], None), start_instance(tiny_llama[0], "prefill", max_num_batched_tokens=32),
               start_instance(tiny_llama[0], "decode")]
    yield started
    for server, engine in started:
        server.stop()
        engine.shutdown()


def metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == name for s in f.samples)


def greedy(base_url: str, prompts: list, stream: bool, n: int = 2, headers: dict | None = None) -> list[list[list[int]]]:
    """Each prompt's n greedy completions as token ids (logprobs carry them), streamed or not."""
    out = []
    with httpx.Client(base_url=base_url, timeout=60, headers=headers) as c:
        for prompt in prompts:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, "n": n, "logprobs": 0,
                    "ignore_eos": True, "stream": stream}
            texts = [[] for _ in range(n)]
            if stream:
                with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200, r.read()
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            event = json.loads(line[6:])
                            assert "error" not in event, event
                            for choice in event["choices"]:
                                texts[choice["index"]] += choice["logprobs"]["tokens"]
            else:
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                for choice in r.json()["choices"]:
                    texts[choice["index"]] = choice["logprobs"]["tokens"]
            out.append(texts)
    return out


@pytest.mark.parametrize("transport", ["shm", "http"])
def test_disaggregated_output_equals_single_instance(instances, transport):
    (single, _), (prefill, prefill_engine), (decode, decode_engine) = instances
    decode_engine.receiver.transport = transport
    seed = {"shm": 1, "http": 2}[transport]  # prompts this instance has not cached yet
    prompts = random_prompts([100, 143, 67], seed=seed)  # 6, 8 and 4 full blocks of 16
    reference = greedy(single.base_url, prompts, stream=False)
    router = start_router(prefill.base_url, decode.base_url)
    try:
        blocks_before = metric(decode.base_url, "fuselm_kv_transfer_blocks")
        computed_before = decode_engine.engine.stats.num_prompt_tokens
        assert greedy(router.base_url, prompts, stream=False) == reference
        moved = metric(decode.base_url, "fuselm_kv_transfer_blocks") - blocks_before
        assert moved == sum((len(p) - 1) // 16 for p in prompts)
        # The decode instance computed only each prompt's last partial block, once per sample.
        tails = sum(len(p) - 16 * ((len(p) - 1) // 16) for p in prompts)
        assert decode_engine.engine.stats.num_prompt_tokens - computed_before == 2 * tails
        # The same prompts again: the decode instance's prefix cache holds them, nothing moves.
        assert greedy(router.base_url, prompts, stream=True) == reference
        assert metric(decode.base_url, "fuselm_kv_transfer_blocks") - blocks_before == moved
        assert metric(decode.base_url, "fuselm_kv_transfer_fallbacks") == 0
        status = httpx.get(router.base_url + "/status").json()
        assert {i["role"] for i in status["instances"]} == {"prefill", "decode"}
    finally:
        router.stop()
    assert wait_until(lambda: pool_is_full(prefill_engine)) and wait_until(lambda: pool_is_full(decode_engine))


def test_failed_transfer_falls_back_to_recompute(instances):
    (single, _), _, (decode, decode_engine) = instances
    dead = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    prompts = random_prompts([90], seed=3)
    before = metric(decode.base_url, "fuselm_kv_transfer_fallbacks")
    assert greedy(decode.base_url, prompts, stream=False, headers={"x-fuselm-prefill-url": dead}) == \
        greedy(single.base_url, prompts, stream=False)
    assert metric(decode.base_url, "fuselm_kv_transfer_fallbacks") == before + 1
    assert wait_until(lambda: pool_is_full(decode_engine))


def test_killed_decode_instance_gives_a_clear_error(instances, decode_process):
    _, (prefill, prefill_engine), _ = instances
    decode, url = decode_process

    def up() -> bool:
        try:
            return httpx.get(url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(up, 60), "the decode instance did not start"
    router = start_router(prefill.base_url, url)
    try:
        from openai import APIError, OpenAI

        client = OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model=MODEL, prompt=random_prompts([80], seed=4)[0], max_tokens=900,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        start = None
        with pytest.raises(APIError, match=f"instance {url}"):
            for i, _ in enumerate(stream):
                if i == 3:
                    decode.send_signal(signal.SIGKILL)
                    start = time.monotonic()
        assert start is not None and time.monotonic() - start < 10
    finally:
        router.stop()
    assert wait_until(lambda: pool_is_full(prefill_engine))


def test_slot_pool_never_reuses_slots_of_a_failed_transfer():
    from fuselm.disagg.transport import SlotPool

    pool = SlotPool(block_bytes=64, num_slots=4)
    first, slots_a = pool.take(2)
    _, slots_b = pool.take(2)
    assert pool.take(1) is None  # all four leased
    pool.give(first, slots_a, clean=True)
    assert sorted(pool.take(2)[1]) == sorted(slots_a)  # a clean transfer's slots come back
    pool.give(first, slots_b, clean=False)  # a failed transfer: the prefill may still write there
    second, _ = pool.take(4)
    assert second is not first and second.name != first.name
    pool.close()


SHM_DIR = Path("/dev/shm")


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory is not under /dev/shm here")
def test_decode_engine_shutdown_removes_its_transfer_segment(tiny_llama):
    """The decode side's segment (256 MB by default) is gone from /dev/shm once its engine shuts down,
    also after the prefill side (here the same process) attached it."""
    from fuselm.disagg.transport import attach

    server, engine = start_instance(tiny_llama[0], "decode")
    server.stop()
    segment, _ = engine.receiver.slot_pool.take(1)
    attach(segment.name, segment.block_bytes)
    assert (SHM_DIR / segment.name).exists()
    engine.shutdown()
    assert not (SHM_DIR / segment.name).exists()


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory is not under /dev/shm here")
def test_segment_of_a_crashed_process_is_removed_by_its_resource_tracker():
    """A process that made a segment and attached it itself, then died without closing it: the resource
    tracker still removes the segment (attaching must not drop the creator's own registration)."""
    code = ("import os; from fuselm.disagg.transport import SharedSlots, attach; s = SharedSlots(64, 4); "
            "attach(s.name, 64); print(s.name, flush=True); os._exit(1)")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60)
    name = out.stdout.strip()
    assert name, out.stderr
    assert wait_until(lambda: not (SHM_DIR / name).exists(), 20), f"{name} is left in {SHM_DIR}"


def test_sliding_window_model_is_refused(tmp_path):
    """A model with sliding-window layers keeps KV groups the transfer does not move: refused, not served wrong."""
    import transformers

    from fuselm.disagg.serve import enable_disaggregation, engine_class
    from fuselm.server.app import build_app
    from tiny_models import save_tokenizer

    save_tokenizer(tmp_path)
    config = transformers.MistralConfig(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        sliding_window=24, bos_token_id=1, eos_token_id=4)
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    engine = engine_class("prefill").from_options(str(tmp_path), dtype="float32", device="cpu", log_stats_interval=60,
                                                  log_requests=False)
    try:
        with pytest.raises(ValueError, match="sliding-window"):
            enable_disaggregation(build_app(engine, MODEL), engine, "prefill")
    finally:
        engine.shutdown()


def test_api_key_guards_the_kv_route(tiny_llama, instances):
    """With --api-key the prefill instance's /kv/prefill needs the key, and a decode instance that has it
    still receives the blocks (no fallback): the same greedy output as the single instance."""
    single = instances[0][0]
    keyed = [start_instance(tiny_llama[0], mode, api_key="k3y") for mode in ("prefill", "decode")]
    (prefill, _), (decode, decode_engine) = keyed
    router = start_router(prefill.base_url, decode.base_url)
    try:
        r = httpx.post(prefill.base_url + "/kv/prefill", json={"token_ids": [1, 2, 3], "blocks": [0]})
        assert r.status_code == 401
        prompts = random_prompts([70, 90], seed=11)
        auth = {"Authorization": "Bearer k3y"}
        assert greedy(router.base_url, prompts, stream=False, headers=auth) == greedy(single.base_url, prompts,
                                                                                     stream=False)
        assert metric(decode.base_url, "fuselm_kv_transfer_blocks") > 0
        assert metric(decode.base_url, "fuselm_kv_transfer_fallbacks") == 0
    finally:
        router.stop()
        for server, engine in keyed:
            server.stop()
            engine.shutdown()
