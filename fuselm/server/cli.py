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

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (continuous batching across requests)",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, "
                    "/health and /metrics. Request and engine status lines are logged at INFO.")
    g = p.add_argument_group("server options")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("FUSELM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize "
                        "(default: $FUSELM_API_KEY, else no key)")
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the --model value)")
    g.add_argument("--log-stats-interval", type=float, default=10.0, help="seconds between engine status lines")
    g.add_argument("--disable-log-requests", action="store_true", help="no log line per finished request")
    g.add_argument("--uvicorn-log-level", default="warning", help="uvicorn's own log level (access log at info)")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fuselm.cli import engine_kwargs
    from fuselm.engine.async_engine import AsyncLLMEngine
    from fuselm.server.app import build_app

    fuselm_logger = logging.getLogger("fuselm")
    if fuselm_logger.getEffectiveLevel() > logging.INFO and args.log_level.upper() == "WARNING":
        fuselm_logger.setLevel(logging.INFO)  # the server's request/status lines are its default output
    engine = AsyncLLMEngine.from_options(log_stats_interval=args.log_stats_interval,
                                         log_requests=not args.disable_log_requests, **engine_kwargs(args))
    name = args.served_model_name or args.model or "SmolLM2-135M-Instruct"
    app = build_app(engine, served_model_name=name, api_key=args.api_key)
    logger.info("serving %r on http://%s:%d (OpenAI API under /v1)%s", name, args.host, args.port,
                ", API key required" if args.api_key else "")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    finally:
        engine.shutdown()
    return 0
