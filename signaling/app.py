"""Application factory and the server's shared state: engine worker, VAD, calls.

Start-up order: the HTTP listener comes up at once (``/healthz`` answers, ``/readyz`` says
"loading"), then the engine is loaded and warmed up on its worker thread; only then is the
server ready and offers are accepted. Shutdown closes every call (flushing open utterances),
then the engine. On SIGTERM the CLI first calls ``ServerState.drain``: new calls get
``503 shutting_down`` while open ones get ``server.shutdown_grace_s`` to finish their
utterances over their still-open data channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from agent.config import Config
from agent.engines.base import Engine
from agent.engines.worker import EngineWorker
from agent.errors import EngineLoadError
from agent.peer import restrict_host_addresses
from agent.session import CallSession, SessionDeps
from agent.vad import Vad, create_vad
from signaling.errors import ERROR_CODE, ApiError, Handler, error_middleware
from signaling.metrics import ServerMetrics
from signaling.ratelimit import TokenBucketLimiter
from signaling.security import Security

log = logging.getLogger(__name__)


@dataclass(eq=False)
class CallRecord:
    """What the server keeps per ``pc_id`` beside its session: who may touch the call, the
    lock that serialises its offers and trickles, and the ICE session candidates must name."""

    #: SHA-256 of the bearer token that created the call (never the token itself), or of the
    #: client address when the server has no tokens.
    owner: bytes
    #: Held across a whole offer (renegotiation, restart) or trickle for this ``pc_id``: two
    #: restarts at once would each build a peer, and all but the last would run unowned.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: ``(mid, ice-ufrag)`` of each media section of the current remote description.
    media: tuple[tuple[str, str], ...] = ()
    #: ICE candidates accepted over the call's life, in its offers and trickled
    #: (``limits.candidates_per_call``).
    candidates: int = 0


@dataclass(eq=False)
class ServerState:
    """Everything the routes share. Lives in the app, never in module globals."""

    config: Config
    status: Literal["loading", "ready", "failed", "stopping"] = "loading"
    error: str | None = None
    worker: EngineWorker | None = None
    vad: Vad | None = None
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="vad")
    )
    calls: dict[str, CallSession] = field(default_factory=dict)
    #: One per ``pc_id`` in ``calls``; a restart hands its record on to the new peer.
    records: dict[str, CallRecord] = field(default_factory=dict)
    #: Call slots held by offers still being answered (they count against ``max_calls``).
    reserved: int = 0
    #: The background engine load, when the server listens before it is ready.
    load_task: asyncio.Task[None] | None = None
    #: HTTP requests being answered; the shutdown lets them finish within its grace.
    inflight: int = 0
    metrics: ServerMetrics = field(init=False)
    #: ``limits.offers_per_minute_per_ip``; ``None`` when 0 (no limit).
    offer_limiter: TokenBucketLimiter | None = field(init=False)
    #: ``limits.patches_per_minute_per_ip``; ``None`` when 0 (no limit).
    patch_limiter: TokenBucketLimiter | None = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(lambda: len(self.calls), lambda: self.worker)
        per_minute = self.config.limits.offers_per_minute_per_ip
        self.offer_limiter = TokenBucketLimiter(per_minute) if per_minute else None
        per_minute = self.config.limits.patches_per_minute_per_ip
        self.patch_limiter = TokenBucketLimiter(per_minute) if per_minute else None

    async def load(self, engine: Engine | None = None) -> None:
        """Load the VAD and the engine (or use ``engine``), warm up, become ready."""
        try:
            loop = asyncio.get_running_loop()
            self.vad = await loop.run_in_executor(self.executor, create_vad, self.config.vad)
            self.worker = await EngineWorker.start(self.config.engine, engine)
            self.worker.on_batch = self.metrics.observe_batch
        except EngineLoadError as exc:
            self.status, self.error = "failed", str(exc)
            raise
        except Exception as exc:
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            raise EngineLoadError(self.error) from exc
        self.status = "ready"
        log.info("engine %s ready", self.worker.engine.name)

    def require_ready(self) -> None:
        """Raise the 503 a request gets while the server loads, stops, or has failed."""
        if self.status == "stopping":
            raise ApiError(
                503,
                "shutting_down",
                "the server is shutting down and takes no new work",
                type_="server_error",
                headers={"Retry-After": "5"},
            )
        if self.status != "ready" or self.worker is None or self.vad is None:
            raise ApiError(
                503,
                "not_ready",
                f"server is {self.status}" + (f": {self.error}" if self.error else ""),
                type_="server_error",
                headers={"Retry-After": "5"},
            )

    def deps(self) -> SessionDeps:
        assert self.worker is not None and self.vad is not None
        return SessionDeps(self.config, self.worker, self.vad, self.executor, self.metrics)

    @contextlib.contextmanager
    def call_slot(self, new: bool = True) -> Iterator[None]:
        """Hold a call slot while an offer is answered, so that offers in flight count against
        ``limits.max_calls`` too; ``new=False`` for a restart, whose peer takes its old one's
        slot. Released however the offer ends (answered, refused, or cancelled)."""
        limit = self.config.limits.max_calls
        if new and len(self.calls) + self.reserved >= limit:
            raise ApiError(
                503,
                "too_many_calls",
                f"the server holds its maximum of {limit} calls",
                type_="server_error",
                headers={"Retry-After": "10"},
            )
        self.reserved += 1
        try:
            yield
        finally:
            self.reserved -= 1

    def add_call(self, pc_id: str, session: CallSession, record: CallRecord) -> None:
        self.calls[pc_id] = session
        self.records[pc_id] = record

    def forget(self, session: CallSession) -> None:
        for pc_id, known in list(self.calls.items()):
            if known is session:
                del self.calls[pc_id]
                self.records.pop(pc_id, None)

    async def drain(self, grace_s: float) -> None:
        """Graceful stop (SIGTERM): refuse new calls, give the open ones ``grace_s`` to
        finish their utterances (their ``completed`` still reaches the client) before they
        are closed, and let HTTP requests in flight finish within the same grace."""
        self.status = "stopping"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        sessions = list(self.calls.values())
        log.info("draining: %d call(s), up to %.1f s", len(sessions), grace_s)
        if sessions:
            await asyncio.gather(*(s.close("server_shutdown", grace_s) for s in sessions))
        while self.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.status = "stopping"
        if self.load_task is not None:
            self.load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.load_task
        sessions = list(self.calls.values())
        if sessions:
            await asyncio.gather(*(s.close("server_shutdown") for s in sessions))
        if self.worker is not None:
            await self.worker.close()
        self.executor.shutdown(wait=True)


STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)


def create_app(config: Config) -> web.Application:
    from signaling.routes import setup_routes

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


@dataclass
class RunningServer:
    """A started server: its runner, bound address and state (used by the CLI and tests)."""

    app: web.Application
    runner: web.AppRunner
    host: str
    port: int

    @property
    def state(self) -> ServerState:
        return self.app[STATE]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_server(
    config: Config, engine: Engine | None = None, wait_ready: bool = True
) -> RunningServer:
    """Listen on ``server.host:server.port`` (port 0 picks a free one), then load the engine.

    With ``wait_ready`` the engine load is awaited and its failure raised (and the listener
    closed); without it, loading continues in the background and ``/readyz`` reports it.
    """
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
    site = web.TCPSite(runner, config.server.host, config.server.port)
    await site.start()
    server = site._server
    assert server is not None and hasattr(server, "sockets")
    for sock in server.sockets:
        _probe_dead_peers(sock)
    port = server.sockets[0].getsockname()[1]
    running = RunningServer(app, runner, config.server.host, port)
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
