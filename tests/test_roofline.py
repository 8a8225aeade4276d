"""The roofline arithmetic: FLOP and byte counts of a step against hand-computed values for a tiny config,
against torch's FLOP counter on the HF model, and the roofline time against its definition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fuselm.bench.roofline import (ModelShape, Row, better_peaks, measure_fma_gflops, measure_scattered_gbps,
                                   measure_stream_gbps, peaks_around, roofline_seconds, step_cost)

# hidden 64, intermediate 160, 2 layers, 4 heads, 2 KV heads, head_dim 16, vocab 384
TINY = ModelShape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=384)
ROWS = [Row(cached=0, new=5, samples=True),   # a whole 5-token prompt
        Row(cached=10, new=1, samples=True),  # a decode
        Row(cached=3, new=2, samples=False)]  # a prompt chunk that does not reach its end


def test_counts_by_hand():
    # one layer: q 64*64 + k,v 2*64*32 + o 64*64 + gate,up,down 3*64*160 = 4096 + 4096 + 4096 + 30720
    assert TINY.layer_weights == 43_008 and TINY.lm_head_weights == 384 * 64
    c = step_cost(TINY, ROWS, weight_bytes=4, kv_bytes=2)
    assert c["tokens"] == 8 and c["sampled_rows"] == 2
    assert c["gemm_flops"] == 2 * 8 * 2 * 43_008 + 2 * 2 * 24_576 == 1_474_560
    # positions attended: 1+2+3+4+5 = 15, 11, 4+5 = 9 -> 35; 4 FLOPs x 4 heads x 16 dims each, 2 layers
    assert c["attention_flops"] == 4 * 4 * 16 * 35 * 2 == 17_920
    assert c["flops"] == 1_474_560 + 17_920
    assert c["weight_bytes"] == (2 * 43_008 + 24_576) * 4 == 442_368
    # K and V of 2 heads x 16 dims x 2 bytes x 2 layers = 256 B per token; contexts 5 + 11 + 5 = 21 tokens
    assert c["kv_read_bytes"] == 21 * 256 == 5_376 and c["kv_write_bytes"] == 8 * 256
    no_sample = step_cost(TINY, [Row(3, 2, False)], 4, 2)
    assert no_sample["weight_bytes"] == 2 * 43_008 * 4  # no row samples: the LM head is not read


def test_roofline_time_is_the_larger_bound():
    cost = {"flops": 2e9, "gemm_flops": 2e9, "attention_flops": 0.0, "weight_bytes": 1e9, "kv_write_bytes": 0.0,
            "kv_read_bytes": 0.5e9}
    peaks = {"fma_gflops": 100.0, "stream_gbps": 10.0, "scattered_gbps": 5.0}
    r = roofline_seconds(cost, peaks)
    assert r["compute_s"] == pytest.approx(0.02) and r["memory_s"] == pytest.approx(0.1 + 0.1)
    assert r["roofline_s"] == r["memory_s"]
    r = roofline_seconds({**cost, "flops": 1e11, "gemm_flops": 1e11}, peaks)
    assert r["roofline_s"] == r["compute_s"] == pytest.approx(1.0)


def test_phase_serial_bound_adds_the_matmul_and_attention_phases():
    peaks = {"fma_gflops": 100.0, "stream_gbps": 10.0, "scattered_gbps": 5.0}
    # matmuls compute-bound (2e9 FLOPs = 0.02 s > 0.1e9 B / 10 GB/s = 0.01 s); attention memory-bound
    cost = {"gemm_flops": 2e9, "attention_flops": 1e8, "flops": 2.1e9, "weight_bytes": 0.1e9,
            "kv_write_bytes": 0.01e9, "kv_read_bytes": 0.05e9}
    r = roofline_seconds(cost, peaks)
    assert r["gemm_phase_s"] == pytest.approx(0.02)
    assert r["attention_phase_s"] == pytest.approx(0.01 + 0.001)
    assert r["phase_serial_s"] == pytest.approx(0.031)
    assert r["roofline_s"] == pytest.approx(max(0.021, 0.011 + 0.01)) and r["phase_serial_s"] >= r["roofline_s"]


def test_gemm_flops_match_torch_flop_counter_on_the_hf_model(tiny_llama):
    from torch.utils.flop_counter import FlopCounterMode

    from fuselm.config import ModelConfig

    path, hf = tiny_llama
    shape = ModelShape.from_config(ModelConfig.from_hf_dict(json.loads((Path(path) / "config.json").read_text())))
    linears = sum(m.weight.numel() for name, m in hf.named_modules()
                  if isinstance(m, torch.nn.Linear) and name != "lm_head")
    assert shape.layers * shape.layer_weights == linears
    assert shape.lm_head_weights == hf.lm_head.weight.numel()
    ids = torch.arange(5, 12).unsqueeze(0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        hf(ids, logits_to_keep=1)  # logits of the last position only, as when a whole prompt samples once
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counts.items() if "mm" in str(op) and "bmm" not in str(op))
    assert step_cost(shape, [Row(0, 7, True)], 4, 4)["gemm_flops"] == matmul


def test_a_step_is_rated_against_the_better_of_the_probes_either_side():
    def probe(at, fma, stream):
        return {"at": at, "threads": 2, "fma_gflops": fma, "stream_gbps": stream, "scattered_block_bytes": 12288}

    timeline = [probe(float("-inf"), 100.0, 30.0), probe(10.0, 60.0, 35.0), probe(20.0, 80.0, 20.0),
                probe(float("inf"), 90.0, 25.0)]
    assert peaks_around(timeline, 4.0) == {"at": float("-inf"), "threads": 2, "fma_gflops": 100.0,
                                           "stream_gbps": 35.0, "scattered_block_bytes": 12288}
    mid = peaks_around(timeline, 15.0)  # between the probes at 10 s and 20 s
    assert (mid["fma_gflops"], mid["stream_gbps"]) == (80.0, 35.0)
    assert peaks_around(timeline, 10.0)["fma_gflops"] == 100.0  # ending at a probe: that one and the one before
    late = peaks_around(timeline, 1e6)  # after the last probe during the run: it and the one after the run
    assert (late["fma_gflops"], late["stream_gbps"]) == (90.0, 25.0)
    with pytest.raises(ValueError):
        peaks_around(timeline[:-1], 1e6)
    assert better_peaks(*timeline)["fma_gflops"] == 100.0 and better_peaks(*timeline)["stream_gbps"] == 35.0


def test_probe_rates_are_positive_and_fma_is_the_better_gemm():
    fma = measure_fma_gflops(n=256, repeats=1)
    assert fma["fma_gflops"] == max(v for k, v in fma.items() if k.endswith("_gflops") and k != "fma_gflops") > 0
    stream = measure_stream_gbps(mib=8, repeats=1)
    assert stream["stream_gbps"] == max(stream["stream_read_gbps"], stream["stream_copy_gbps"]) > 0
    scattered = measure_scattered_gbps(4096, pool_mib=8, gather_mib=2, repeats=1)
    assert scattered["scattered_gbps"] > 0 and scattered["scattered_block_bytes"] == 4096
