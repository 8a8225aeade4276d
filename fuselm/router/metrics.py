"""The router's own Prometheus metrics: requests and latency per instance, and each instance's state.

Counters and histograms are recorded as requests pass; the per-instance gauges (healthy, in flight,
and the queue lengths, KV use and prefix-cache hit rate its health check scraped) are set when
/metrics is read, as are the KV-transfer figures of disaggregated serving.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_INSTANCE_GAUGES = {
    "running": "Sequences in the instance's running batch (scraped)",
    "waiting": "Sequences waiting in the instance's queue (scraped)",
    "kv_usage": "Share of the instance's KV cache blocks in use, 0-1 (scraped)",
    "prefix_hit_rate": "The instance's prefix-cache hit rate since its start, 0-1 (scraped)",
}


class RouterMetrics:
    def __init__(self) -> None:
        disable_created_metrics()
        self.registry = reg = CollectorRegistry(auto_describe=True)
        labels = ["instance", "role"]
        self.requests = Counter("fuselm_router_requests", "Requests routed, by instance and outcome (ok: 2xx; "
                                "status: an error the instance answered, passed through; failed: the instance did "
                                "not answer)", labels + ["outcome"], registry=reg)
        self.latency = Histogram("fuselm_router_request_latency_seconds", "Arrival at the router to the last byte "
                                 "of the answer", labels, buckets=_BUCKETS, registry=reg)
        self.first_byte = Histogram("fuselm_router_time_to_first_byte_seconds", "Arrival at the router to the first "
                                    "byte of the instance's answer (streams: the first chunk)", labels,
                                    buckets=_BUCKETS, registry=reg)
        self.healthy = Gauge("fuselm_router_instance_healthy", "1 while the instance is in routing", labels,
                             registry=reg)
        self.in_flight = Gauge("fuselm_router_instance_in_flight", "Requests the router has in flight on the "
                               "instance", labels, registry=reg)
        self.gauges = {key: Gauge(f"fuselm_router_instance_{key}", doc, labels, registry=reg)
                       for key, doc in _INSTANCE_GAUGES.items()}
        self.transfer_bytes = Gauge("fuselm_router_kv_transfer_bytes", "KV bytes the decode instance received from "
                                    "prefill instances since its start (scraped)", labels, registry=reg)
        self.transfer_blocks = Gauge("fuselm_router_kv_transfer_blocks", "KV blocks the decode instance received "
                                     "since its start (scraped)", labels, registry=reg)
        self.transfer_seconds = Gauge("fuselm_router_kv_transfer_seconds", "Seconds the decode instance spent "
                                      "receiving KV since its start, first request to last block (scraped)", labels,
                                      registry=reg)
        self.transfer_fallbacks = Gauge("fuselm_router_kv_transfer_fallbacks", "Transfers that failed, so the decode "
                                        "instance recomputed the prompt (scraped)", labels, registry=reg)

    def render(self, instances: list[tuple[str, object]]) -> bytes:
        """`instances`: (role, Replica) pairs."""
        for role, inst in instances:
            labels = (inst.url, role)
            self.healthy.labels(*labels).set(1 if inst.healthy else 0)
            self.in_flight.labels(*labels).set(inst.in_flight)
            for key, gauge in self.gauges.items():
                gauge.labels(*labels).set(inst.stats.get(key, 0.0))
            if role == "decode":
                self.transfer_bytes.labels(*labels).set(inst.stats.get("kv_transfer_bytes", 0.0))
                self.transfer_blocks.labels(*labels).set(inst.stats.get("kv_transfer_blocks", 0.0))
                self.transfer_seconds.labels(*labels).set(inst.stats.get("kv_transfer_seconds", 0.0))
                self.transfer_fallbacks.labels(*labels).set(inst.stats.get("kv_transfer_fallbacks", 0.0))
        return generate_latest(self.registry)
