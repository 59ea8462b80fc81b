"""`ember serve`: load the model, then serve the OpenAI API with uvicorn.

This module is imported by `ember`'s parser, so it imports nothing optional at the top:
fastapi, uvicorn and friends load only when `serve` runs.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os

logger = logging.getLogger("ember.server")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
SERVER_EXTRA_HINT = "the server needs its optional dependencies: pip install 'ember[server]'"


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ember.cli import add_engine_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: loopback only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("EMBER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $EMBER_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients must send (default: the --model argument)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="refuse new requests with 503 while this many sequences wait for a free "
                        "running slot (--max-num-seqs) (default: no limit)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body accepted; larger ones get 413")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish on shutdown before aborting them")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import prometheus_client
        import uvicorn

        from ember.server.app import build_app
        from ember.server.async_engine import AsyncEngine
    except ImportError as e:
        raise ImportError(f"{SERVER_EXTRA_HINT} ({e})") from e
    from ember.cli import engine_kwargs
    from ember.config import EngineConfig
    from ember.engine.engine import Engine

    if args.max_waiting is not None and args.max_waiting < 1:
        raise ValueError("--max-waiting must be >= 1")
    prometheus_client.disable_created_metrics()  # no `_created` series beside every counter

    names = args.served_model_name or [args.model]
    logging.getLogger("ember").setLevel(logging.INFO)
    engine = Engine(EngineConfig(model=args.model, **engine_kwargs(args)))
    async_engine = AsyncEngine(engine, names[0], args.max_waiting)
    app = build_app(async_engine, names, args.model, api_key=args.api_key,
                    max_body_bytes=args.max_request_bytes)
    drain = args.shutdown_timeout

    class Server(uvicorn.Server):
        """On shutdown, in-flight requests get `drain` seconds to finish; then the engine
        aborts them, so their clients still get a well-formed (finish_reason "abort") end.
        uvicorn's own cancellation stays as a backstop a little later."""

        async def shutdown(self, sockets: list | None = None) -> None:
            async def abort_late() -> None:
                await asyncio.sleep(drain)
                logger.warning("shutdown: in-flight requests did not finish within %.0f s; aborting", drain)
                async_engine.abort_all()

            timer = asyncio.create_task(abort_late())
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=drain + 5.0)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
