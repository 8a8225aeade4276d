"""Turning a `fuselm serve` app into a prefill or a decode instance (`--disaggregation-mode`)."""

from __future__ import annotations

from fuselm.engine.async_engine import AsyncLLMEngine

MODES = ("prefill", "decode")


def engine_class(mode: str | None) -> type[AsyncLLMEngine]:
    if mode == "decode":
        from fuselm.disagg.decode import DecodeEngine

        return DecodeEngine
    return AsyncLLMEngine


def enable_disaggregation(app, engine: AsyncLLMEngine, mode: str, transport: str = "auto",
                          api_key: str | None = None) -> None:
    """Prefill: add POST /kv/prefill (behind the app's API key, if it has one). Decode: receive KV for
    requests that name a prefill instance (the engine must be a DecodeEngine), sending `api_key` to it,
    and show the transfer totals on /metrics."""
    if mode not in MODES:
        raise ValueError(f"unknown disaggregation mode {mode!r}; choose one of {', '.join(MODES)}")
    config = engine.engine.config
    if config.tensor_parallel_size > 1:
        raise ValueError("--disaggregation-mode does not work with --tensor-parallel-size > 1 yet")
    if len(engine.engine.runner.kv_groups) > 1 or any(group.window for group in engine.engine.runner.kv_groups):
        # Sliding-window layers keep their blocks in block tables of their own (core/kv_groups.py); the
        # transfer moves only the full-attention table, so such a model is refused, not served wrongly.
        raise ValueError("--disaggregation-mode does not work yet with models that have sliding-window layers "
                         "(their KV cache groups are not transferred)")
    if mode == "prefill":
        from fuselm.disagg.prefill import KVExporter, prefill_routes

        app.include_router(prefill_routes(KVExporter(engine)))
        return
    from fuselm.disagg.decode import DecodeEngine, KVReceiver, PrefillHeaderMiddleware

    if not isinstance(engine, DecodeEngine):
        raise ValueError("a decode instance's engine must be a DecodeEngine (engine_class('decode'))")
    if not config.enable_prefix_caching:
        raise ValueError("--disaggregation-mode decode needs prefix caching: received blocks become prefix-cache "
                         "hits (drop --no-enable-prefix-caching)")
    engine.receiver = KVReceiver(engine, transport, api_key)
    app.add_middleware(PrefillHeaderMiddleware)
    app.state.metrics.registry.register(engine.receiver)
