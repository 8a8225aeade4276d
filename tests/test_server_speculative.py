"""The server with speculative decoding on (ngram): streams carry several tokens per chunk and end
with the same text as plain offline decoding; /metrics and the status line report acceptance."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fuselm import LLM, SamplingParams
from server_helpers import MODEL, ServerThread, wait_until

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "adaptive": False}
PROMPTS = ["the quick brown fox jumps over the lazy dog " * 3, "it was the best of times it was the worst of times",
           "Paris is the capital of France and Paris is"]


@pytest.fixture(scope="module")
def spec_server(tiny_llama):
    from fuselm.engine.async_engine import AsyncLLMEngine
    from fuselm.server.app import build_app

    engine = AsyncLLMEngine.from_options(tiny_llama[0], dtype="float32", device="cpu", log_stats_interval=0.2,
                                         speculative_config=SPEC)
    srv = ServerThread(build_app(engine, MODEL)).start()
    yield srv
    srv.stop()
    engine.shutdown()


def test_streams_match_plain_decoding(spec_server, tiny_llama, caplog):
    client = openai.OpenAI(base_url=f"{spec_server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    offline = LLM(tiny_llama[0], dtype="float32", device="cpu")
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="fuselm"):
        for prompt in PROMPTS:
            want = offline.generate(prompt, params, use_tqdm=False)[0].outputs[0].text
            stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True},
                                               stream_options={"include_usage": True})
            pieces, usage = [], None
            for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].text)
                usage = chunk.usage or usage
            assert "".join(pieces) == want
            assert usage.completion_tokens == 30
            assert len([p for p in pieces if p]) < 30  # accepted proposals arrive together
            full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0,
                                             extra_body={"ignore_eos": True})
            assert full.choices[0].text == want
        text = httpx.get(f"{spec_server.base_url}/metrics").text
        # the status line is written on the engine's next stats tick (every 0.2 s), which can fall after the
        # last request when all of them ran inside one tick: wait for it instead of racing it
        logged = wait_until(lambda: any("speculative decoding:" in r.getMessage() and "acceptance rate" in
                                        r.getMessage() for r in caplog.records), timeout=5.0)
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert values["fuselm_spec_decode_num_accepted_tokens"] > 0
    assert values["fuselm_spec_decode_num_draft_tokens"] >= values["fuselm_spec_decode_num_accepted_tokens"]
    assert 0 < values["fuselm_spec_decode_acceptance_rate"] <= 1
    assert values["fuselm_spec_decode_mean_acceptance_length"] > 1
    assert logged
