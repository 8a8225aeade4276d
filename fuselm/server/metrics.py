"""Prometheus metrics for the server, in a CollectorRegistry of their own (one per app).

Request-level metrics are recorded in the engine thread from each RequestOutput (prometheus-client
is thread-safe); the gauges are read from the engine's snapshot when /metrics is scraped.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from fuselm.engine.async_engine import EngineSnapshot
from fuselm.outputs import RequestOutput
from fuselm.spec.speculator import SpecStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0)

METRIC_NAMES = (
    "fuselm_requests_total", "fuselm_prompt_tokens_total", "fuselm_generation_tokens_total",
    "fuselm_time_to_first_token_seconds", "fuselm_inter_token_latency_seconds",
    "fuselm_e2e_request_latency_seconds", "fuselm_request_queue_time_seconds",
    "fuselm_num_requests_running", "fuselm_num_requests_waiting", "fuselm_kv_cache_usage_ratio",
    "fuselm_prefix_cache_hit_rate", "fuselm_num_preemptions",
    "fuselm_spec_decode_num_drafts", "fuselm_spec_decode_num_draft_tokens",
    "fuselm_spec_decode_num_accepted_tokens", "fuselm_spec_decode_acceptance_rate",
    "fuselm_spec_decode_mean_acceptance_length", "fuselm_cascade_attention_kv_tokens_saved",
)
# MoE models only (fuselm/runner/expert_stats.py): tokens per layer and the load imbalance of its experts;
# tokens per expert too while layers x experts stays under MAX_EXPERT_SERIES (series, not a summary)
MOE_METRIC_NAMES = ("fuselm_moe_layer_tokens", "fuselm_moe_expert_load_max_over_mean", "fuselm_moe_expert_tokens")
MAX_EXPERT_SERIES = 2048


class ServerMetrics:
    """Implements the AsyncLLMEngine OutputObserver protocol and renders the /metrics page."""

    def __init__(self, model_name: str) -> None:
        disable_created_metrics()  # no *_created series: they double the page and no dashboard uses them
        self.registry = registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.model_name = model_name
        self.requests = Counter("fuselm_requests", "Finished requests by finish reason (for n > 1: the first "
                                "sample's reason; 'error' when the request failed)", labels + ["finish_reason"],
                                registry=registry)
        self.prompt_tokens = Counter("fuselm_prompt_tokens", "Prompt tokens of finished requests",
                                     labels, registry=registry)
        self.generation_tokens = Counter("fuselm_generation_tokens", "Generated tokens of finished requests "
                                         "(all samples)", labels, registry=registry)
        self.ttft = Histogram("fuselm_time_to_first_token_seconds", "Arrival to first generated token",
                              labels, buckets=_LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("fuselm_inter_token_latency_seconds", "Time between consecutive output tokens "
                             "of a request", labels, buckets=_ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("fuselm_e2e_request_latency_seconds", "Arrival to finish", labels,
                             buckets=_E2E_BUCKETS, registry=registry)
        self.queue_time = Histogram("fuselm_request_queue_time_seconds", "Arrival to first scheduled step",
                                    labels, buckets=_LATENCY_BUCKETS, registry=registry)
        self.running = Gauge("fuselm_num_requests_running", "Sequences in the running batch", labels,
                             registry=registry)
        self.waiting = Gauge("fuselm_num_requests_waiting", "Sequences waiting to be scheduled", labels,
                             registry=registry)
        self.kv_usage = Gauge("fuselm_kv_cache_usage_ratio", "Share of KV cache blocks in use (0-1)", labels,
                              registry=registry)
        self.hit_rate = Gauge("fuselm_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / "
                              "prompt tokens looked up (0-1), since start", labels, registry=registry)
        self.preemptions = Gauge("fuselm_num_preemptions", "Preemptions (recompute) since start", labels,
                                 registry=registry)
        # Speculative decoding (0 when it is off): engine totals since start, set at scrape time.
        self.spec_drafts = Gauge("fuselm_spec_decode_num_drafts", "Verifications of speculative tokens (rows that "
                                 "carried proposals) since start", labels, registry=registry)
        self.spec_draft_tokens = Gauge("fuselm_spec_decode_num_draft_tokens", "Speculative tokens proposed and "
                                       "verified since start", labels, registry=registry)
        self.spec_accepted = Gauge("fuselm_spec_decode_num_accepted_tokens", "Speculative tokens accepted since start",
                                   labels, registry=registry)
        self.spec_rate = Gauge("fuselm_spec_decode_acceptance_rate", "Accepted / proposed speculative tokens (0-1)",
                               labels, registry=registry)
        self.spec_length = Gauge("fuselm_spec_decode_mean_acceptance_length", "Tokens emitted per verification, the "
                                 "bonus token included", labels, registry=registry)
        self.cascade_saved = Gauge("fuselm_cascade_attention_kv_tokens_saved", "KV-cache token reads that "
                                   "shared-prefix attention did not repeat, per layer, since start: each step a "
                                   "group of R sequences sharing S cached tokens reads them once instead of R times "
                                   "and counts (R - 1) x S", labels, registry=registry)
        self.moe_layer_tokens = Gauge("fuselm_moe_layer_tokens", "Token-to-expert assignments (tokens x top-k) of "
                                      "an MoE layer since start", labels + ["layer"], registry=registry)
        self.moe_imbalance = Gauge("fuselm_moe_expert_load_max_over_mean", "An MoE layer's most loaded expert's "
                                   "assignments over the mean expert's, since start (1 = even)", labels + ["layer"],
                                   registry=registry)
        self.moe_expert_tokens = Gauge("fuselm_moe_expert_tokens", "Token assignments of one expert of an MoE layer "
                                       "since start (absent for models with more than "
                                       f"{MAX_EXPERT_SERIES} layer x expert pairs: see /expert_stats)",
                                       labels + ["layer", "expert"], registry=registry)
        self._lock = threading.Lock()
        self._progress: dict[str, tuple[int, float]] = {}  # request id -> (tokens seen, time of the last)

    def on_output(self, output: RequestOutput, now: float) -> None:
        name = self.model_name
        steps = max((len(c.token_ids) for c in output.outputs), default=0)  # samples advance together
        with self._lock:
            seen, last = self._progress.get(output.request_id, (0, now))
            if output.finished:
                self._progress.pop(output.request_id, None)
            elif steps:
                self._progress[output.request_id] = (steps, now)
        if seen and steps > seen:
            gap = (now - last) / (steps - seen)
            for _ in range(steps - seen):
                self.itl.labels(name).observe(gap)
        if not output.finished:
            return
        reason = "error" if output.error else (output.outputs[0].finish_reason if output.outputs else None)
        self.requests.labels(name, reason or "unknown").inc()
        self.prompt_tokens.labels(name).inc(len(output.prompt_token_ids))
        self.generation_tokens.labels(name).inc(sum(len(c.token_ids) for c in output.outputs))
        m = output.metrics
        if m is None:
            return
        if m.first_token_time is not None:
            self.ttft.labels(name).observe(max(0.0, m.first_token_time - m.arrival_time))
        if m.first_scheduled_time is not None:
            self.queue_time.labels(name).observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        self.e2e.labels(name).observe(max(0.0, (m.finished_time or now) - m.arrival_time))

    def render(self, snapshot: EngineSnapshot, expert_stats=None) -> bytes:
        """`expert_stats`: the engine's fuselm.runner.expert_stats.ExpertStats (MoE models), or None."""
        name = self.model_name
        if expert_stats is not None:
            self._render_experts(expert_stats)
        self.running.labels(name).set(snapshot.num_running)
        self.waiting.labels(name).set(snapshot.num_waiting)
        self.kv_usage.labels(name).set(snapshot.kv_usage)
        self.hit_rate.labels(name).set(snapshot.prefix_hit_rate)
        self.preemptions.labels(name).set(snapshot.num_preemptions)
        self.cascade_saved.labels(name).set(snapshot.cascade_kv_tokens_saved)
        spec = snapshot.spec or SpecStats()  # all zeros when speculative decoding is off
        self.spec_drafts.labels(name).set(spec.num_drafts)
        self.spec_draft_tokens.labels(name).set(spec.num_draft_tokens)
        self.spec_accepted.labels(name).set(spec.num_accepted_tokens)
        self.spec_rate.labels(name).set(spec.acceptance_rate)
        self.spec_length.labels(name).set(spec.mean_acceptance_length)
        return generate_latest(self.registry)

    def _render_experts(self, stats) -> None:
        name = self.model_name
        loads = stats.load_counts()
        per_expert = len(stats.layers) * stats.num_experts <= MAX_EXPERT_SERIES
        for layer, load in zip(stats.layers, loads):
            total = sum(load)
            self.moe_layer_tokens.labels(name, str(layer)).set(total)
            self.moe_imbalance.labels(name, str(layer)).set(max(load) * len(load) / total if total else 1.0)
            if per_expert:
                for expert, count in enumerate(load):
                    self.moe_expert_tokens.labels(name, str(layer), str(expert)).set(count)
