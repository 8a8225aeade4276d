"""`fuselm router`: serve one OpenAI-compatible endpoint over several fuselm instances.

fuselm/cli.py finds this module and calls register(subparsers) to add the subcommand.
"""

from __future__ import annotations

import argparse
import logging

from fuselm.router.policies import POLICIES

logger = logging.getLogger("fuselm")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "router", help="OpenAI-compatible router over fuselm replicas, or over prefill and decode instances",
        description="Route /v1/completions and /v1/chat/completions to --worker replicas (policy --policy), or "
                    "run disaggregated prefill/decode over --prefill and --decode instances (`fuselm serve "
                    "--disaggregation-mode prefill|decode`). Also serves /v1/models, /tokenize, /detokenize, "
                    "/health, /metrics (its own) and /status (JSON: every instance's health and load).")
    p.add_argument("--worker", action="append", default=[], metavar="URL",
                   help="a replica's base URL, e.g. http://127.0.0.1:8001 (repeat for each replica)")
    p.add_argument("--policy", choices=POLICIES, default="prefix",
                   help="prefix: the replica whose recent prompts share the longest prefix with the request's, "
                        "least-load when the replicas are imbalanced; round_robin; least_load: fewest requests "
                        "in flight (default %(default)s)")
    p.add_argument("--prefill", action="append", default=[], metavar="URL",
                   help="a prefill instance (`fuselm serve --disaggregation-mode prefill`); repeatable")
    p.add_argument("--decode", action="append", default=[], metavar="URL",
                   help="a decode instance (`fuselm serve --disaggregation-mode decode`); repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--health-check-interval", type=float, default=1.0, help="seconds between health checks")
    p.add_argument("--health-check-timeout", type=float, default=5.0,
                   help="seconds an instance's /health may take before it counts as a miss")
    p.add_argument("--health-check-failures", type=int, default=2,
                   help="misses in a row that take an instance out of routing (its in-flight requests fail)")
    p.add_argument("--uvicorn-log-level", default="warning", help="uvicorn's own log level")
    p.set_defaults(func=cmd_router)


def cmd_router(args: argparse.Namespace) -> int:
    import uvicorn

    from fuselm.router.app import build_router_app

    app = build_router_app(args.worker, args.policy, args.prefill, args.decode, args.health_check_interval,
                           args.health_check_timeout, args.health_check_failures)
    logging.getLogger("fuselm").setLevel(min(logging.INFO, logging.getLogger("fuselm").getEffectiveLevel()))
    if args.worker:
        logger.info("routing to %d replicas (%s) on http://%s:%d", len(args.worker), args.policy, args.host, args.port)
    else:
        logger.info("disaggregated: %d prefill, %d decode instances, on http://%s:%d", len(args.prefill),
                    len(args.decode), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    return 0
