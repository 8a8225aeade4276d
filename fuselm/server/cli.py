"""`fuselm serve`: load the engine, then serve the OpenAI-compatible API with uvicorn.

fuselm/cli.py finds this module and calls register(subparsers) to add the subcommand.
"""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger("fuselm")


def register(subparsers) -> None:
    from fuselm.cli import add_engine_args
    from fuselm.server.limits import PRIORITY_RANGE, ServerLimits

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (continuous batching across requests)",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, "
                    "/health and /metrics. Request and engine status lines are logged at INFO.")
    g = p.add_argument_group("server options")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize (default: "
                        "$FUSELM_API_KEY, else no key); give it once per client to accept several keys, each "
                        "key then being one client for fair scheduling")
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the --model file or "
                        "directory name)")
    g.add_argument("--disable-docs", action="store_true",
                   help="turn off /docs, /redoc and /openapi.json (with --api-key they need the key)")
    d = ServerLimits()
    g.add_argument("--max-request-body-bytes", type=int, default=d.max_request_body_bytes,
                   help="larger request bodies get 413 before they are parsed (default %(default)s)")
    g.add_argument("--max-sequences-per-request", type=int, default=d.max_sequences_per_request,
                   help="most sequences (prompts x n) one request may ask for (default %(default)s)")
    g.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings,
                   help="most stop strings per request (default %(default)s)")
    g.add_argument("--max-stop-string-chars", type=int, default=d.max_stop_string_chars,
                   help="longest stop string in characters (default %(default)s)")
    g.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                   help="largest logprobs / top_logprobs a request may ask for, at most 20 (default %(default)s)")
    g.add_argument("--allow-request-priority", action="store_true",
                   help=f"accept a per-request 'priority' in [{PRIORITY_RANGE[0]}, {PRIORITY_RANGE[1]}] (lower is "
                        "served first); without it a non-zero priority gets 400")
    g.add_argument("--tool-call-parser", choices=["hermes", "llama3_json"], default=None,
                   help="how tool calls are read from the output (default: from the chat template's tool format, "
                        "hermes when it has none)")
    g.add_argument("--disaggregation-mode", choices=["prefill", "decode"], default=None,
                   help="run as one side of disaggregated serving behind `fuselm router --prefill URL --decode URL`: "
                        "prefill computes prompts and sends their KV blocks (POST /kv/prefill), decode receives "
                        "them and generates (docs/router.md)")
    g.add_argument("--kv-transfer-transport", choices=["auto", "shm", "http"], default="auto",
                   help="decode side: how KV blocks come from the prefill instance; auto: shared memory when it is "
                        "on this machine (a loopback URL), else in the HTTP stream (default %(default)s)")
    g.add_argument("--log-stats-interval", type=float, default=10.0, help="seconds between engine status lines")
    g.add_argument("--disable-log-requests", action="store_true", help="no log line per finished request")
    g.add_argument("--uvicorn-log-level", default="warning", help="uvicorn's own log level (access log at info)")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fuselm.cli import engine_kwargs
    from fuselm.disagg.serve import enable_disaggregation, engine_class
    from fuselm.server.app import build_app, short_model_name
    from fuselm.server.limits import ServerLimits

    fuselm_logger = logging.getLogger("fuselm")
    if fuselm_logger.getEffectiveLevel() > logging.INFO and args.log_level.upper() == "WARNING":
        fuselm_logger.setLevel(logging.INFO)  # the server's request/status lines are its default output
    limits = ServerLimits(
        max_request_body_bytes=args.max_request_body_bytes, max_sequences_per_request=args.max_sequences_per_request,
        max_stop_strings=args.max_stop_strings, max_stop_string_chars=args.max_stop_string_chars,
        max_logprobs=args.max_logprobs, allow_request_priority=args.allow_request_priority)
    engine = engine_class(args.disaggregation_mode).from_options(
        log_stats_interval=args.log_stats_interval, log_requests=not args.disable_log_requests, **engine_kwargs(args))
    name = args.served_model_name or (short_model_name(args.model) if args.model else "SmolLM2-135M-Instruct")
    api_key = args.api_key or os.environ.get("FUSELM_API_KEY")
    app = build_app(engine, served_model_name=name, api_key=api_key, limits=limits,
                    enable_docs=not args.disable_docs, tool_call_parser=args.tool_call_parser)
    if args.disaggregation_mode:
        enable_disaggregation(app, engine, args.disaggregation_mode, args.kv_transfer_transport,
                              api_key[0] if isinstance(api_key, list) else api_key)
    logger.info("serving %r on http://%s:%d (OpenAI API under /v1)%s", name, args.host, args.port,
                ", API key required" if api_key else "")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    finally:
        engine.shutdown()
    return 0
