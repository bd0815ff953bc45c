"""``voxtral-rtc`` command line: ``serve`` runs the server until SIGINT/SIGTERM;
``transcribe`` transcribes one file in process (``signaling.transcribe_cli``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from agent.config import Config, load_config
from agent.errors import ConfigError, EngineLoadError
from signaling.transcribe_cli import add_transcribe_parser, run_transcribe

if TYPE_CHECKING:
    from signaling.app import RunningServer

#: Past the grace, how long closing peers, the engine and the listener may take before the
#: process exits anyway.
HARD_STOP_MARGIN_S = 10.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxtral-rtc", description="Real-time speech-to-text over WebRTC."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the WebRTC / HTTP server")
    serve.add_argument("--config", help="YAML configuration file (default: built-in defaults)")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    add_transcribe_parser(sub)
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config)
        host, port = getattr(args, "host", None), getattr(args, "port", None)
        overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        if overrides:
            config = config.replace("server", **overrides)
    except ConfigError as exc:
        print(f"voxtral-rtc: configuration error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config)
    if args.command == "serve":
        return asyncio.run(_serve(config))
    if args.command == "transcribe":
        return run_transcribe(args, config)
    return 2  # pragma: no cover - argparse enforces the choices


async def _serve(config: Config) -> int:
    from signaling.app import start_server

    log = logging.getLogger("voxtral_rtc")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("loading engine %s ...", config.engine.kind)
    try:
        server = await start_server(config)
    except ConfigError as exc:
        print(f"voxtral-rtc: configuration error: {exc}", file=sys.stderr)
        return 2
    except EngineLoadError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.server.host, config.server.port, exc)
        return 1
    log.info(
        "serving on %s (engine %s)",
        server.url,
        server.state.worker.engine.name if server.state.worker else "?",
    )
    await stop.wait()
    grace = config.server.shutdown_grace_s
    log.info("shutting down: no new calls; open calls get up to %g s to finish", grace)
    code = 0
    try:
        await asyncio.wait_for(_shutdown(server, grace), grace + HARD_STOP_MARGIN_S)
    except TimeoutError:
        log.error("shutdown overran %g s; exiting anyway", grace + HARD_STOP_MARGIN_S)
        code = 1
    worker = server.state.worker
    if code or (worker is not None and worker.degraded):
        # A hung engine thread can be neither killed nor joined, and the interpreter joins
        # every executor thread at exit: leave without waiting for it.
        logging.shutdown()
        os._exit(code)
    return code


async def _shutdown(server: RunningServer, grace_s: float) -> None:
    """SIGTERM: drain (503 to new calls, open utterances finished within the grace), then
    stop listening, close what is left and the engine."""
    await server.state.drain(grace_s)
    await server.stop()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("call_id", "item_id", "call_sid", "track"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(config: Config) -> None:
    handler = logging.StreamHandler()
    if config.logging.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.logging.level, handlers=[handler], force=True)
    # aioice/aiortc are chatty at INFO about every candidate pair.
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _dump_config(config: Config) -> str:  # pragma: no cover - debugging aid
    return json.dumps(dataclasses.asdict(config), indent=2)


if __name__ == "__main__":
    sys.exit(main())
