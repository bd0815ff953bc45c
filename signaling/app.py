"""Application factory: the HTTP app, its listener, and the server's life.

Start-up order: the HTTP listener comes up at once (``/healthz`` answers, ``/readyz`` says
"loading"), then the engine is loaded and warmed up on its worker thread; only then is the
server ready and offers are accepted. Shutdown closes every call (flushing open utterances),
then the engine. On SIGTERM the CLI first calls ``ServerState.drain``: new calls get
``503 shutting_down`` while open ones get ``server.shutdown_grace_s`` to finish their
utterances over their still-open data channels.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass

from aiohttp import web

from agent.config import Config, ServerConfig
from agent.engines.base import Engine
from agent.errors import ConfigError
from agent.transports.webrtc_peer import restrict_host_addresses
from signaling.errors import ERROR_CODE, Handler, error_middleware
from signaling.routes import setup_routes
from signaling.security import Security
from signaling.state import STATE, ServerState

log = logging.getLogger(__name__)


def create_app(config: Config) -> web.Application:
    restrict_host_addresses(config.webrtc.host_addresses)
    security = Security(config.server)
    app = web.Application(
        # Outermost first: counting sees the JSON error; auth and CORS answer inside it.
        middlewares=[_count_requests, error_middleware, security.middleware()],
        client_max_size=config.server.max_body_bytes,
    )
    app[STATE] = ServerState(config)
    setup_routes(app, config)
    app.on_response_prepare.append(security.on_response_prepare)
    app.on_response_prepare.append(_server_header)
    app.on_shutdown.append(_on_shutdown)
    return app


@web.middleware
async def _count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    state.inflight += 1
    try:
        return await handler(request)
    except asyncio.CancelledError:
        # The client went away mid-request (handler cancellation): its event, not ours.
        request[ERROR_CODE] = "client_closed_request"
        raise
    finally:
        state.inflight -= 1
        code = request.get(ERROR_CODE)
        if code:
            state.metrics.http_error(code)


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp fills in ``Python/3.x aiohttp/3.y`` unless a Server header is already there:
    # versions only help an attacker pick an exploit.
    response.headers["Server"] = "voxtral-rtc"


async def _on_shutdown(app: web.Application) -> None:
    await app[STATE].close()


#: A connection with no request in progress is closed after this many seconds: idle
#: keep-alives, and request headers that never complete (aiohttp's timer runs from the
#: connection's start and is not reset by partial data). aiohttp's default is an hour.
IDLE_CONNECTION_S = 15.0
#: TCP keepalive on every accepted connection: a peer that vanished without a FIN (a
#: half-open connection mid-upload) is found within 30 + 3 x 10 s instead of Linux's 2 h,
#: and its handler is cancelled. Accepted sockets inherit these from the listening one.
_KEEPALIVE = (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


def _probe_dead_peers(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE:
        option = getattr(socket, name, None)
        if option is not None:  # Linux has all three; others keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The TLS context of ``server.tls_cert_file`` / ``tls_key_file``; ``None`` for plain http.

    Read at start-up, so that a missing, unreadable or mismatched file stops the server with
    a message naming the key instead of failing every handshake later.
    """
    if not config.tls_cert_file:
        return None
    for key, path in (
        ("server.tls_cert_file", config.tls_cert_file),
        ("server.tls_key_file", config.tls_key_file),
    ):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"server.tls_cert_file, server.tls_key_file: {config.tls_cert_file} and "
            f"{config.tls_key_file} are not a PEM certificate chain and its private key "
            f"({exc.reason or exc})"
        ) from None
    return context


@dataclass
class RunningServer:
    """A started server: its runner, bound address and state (used by the CLI and tests)."""

    app: web.Application
    runner: web.AppRunner
    host: str
    port: int
    tls: bool = False

    @property
    def state(self) -> ServerState:
        return self.app[STATE]

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_server(
    config: Config, engine: Engine | None = None, wait_ready: bool = True
) -> RunningServer:
    """Listen on ``server.host:server.port`` (port 0 picks a free one), then load the engine.

    With ``wait_ready`` the engine load is awaited and its failure raised (and the listener
    closed); without it, loading continues in the background and ``/readyz`` reports it.
    ``ConfigError`` when the TLS files cannot be used (before anything listens).
    """
    ssl_context = tls_context(config.server)
    app = create_app(config)
    # In-flight requests get the shutdown grace (after ``drain`` there should be none left).
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=max(1.0, config.server.shutdown_grace_s),
        # A client that goes away cancels its handler: a file transcription nobody will
        # read stops decoding and leaves the engine queue at once.
        handler_cancellation=True,
        keepalive_timeout=IDLE_CONNECTION_S,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    server = site._server
    assert server is not None and hasattr(server, "sockets")
    for sock in server.sockets:
        _probe_dead_peers(sock)
    port = server.sockets[0].getsockname()[1]
    running = RunningServer(app, runner, config.server.host, port, tls=ssl_context is not None)
    load = running.state.load(engine)
    if wait_ready:
        try:
            await load
        except BaseException:
            await runner.cleanup()
            raise
    else:
        running.state.load_task = asyncio.create_task(load, name="engine-load")
    return running
