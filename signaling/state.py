"""The server's shared state: engine worker, VAD, live sessions of every transport, limits.

A leaf module: the routes (``signaling.routes``, ``signaling.transcriptions``,
``signaling.realtime``) and the app factory (``signaling.app``) all import it, and it
imports none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web
from threadpoolctl import threadpool_limits

from agent.call_hub import CallHub
from agent.config import Config
from agent.engines.base import Engine, StreamingEngine
from agent.engines.worker import EngineWorker
from agent.errors import EngineLoadError
from agent.session import SessionDeps
from agent.transports.twilio import TwilioStream
from agent.transports.webrtc import WebRtcCall
from agent.transports.websocket import RealtimeSocket
from agent.vad import Vad, create_vad
from signaling.errors import ApiError
from signaling.metrics import ServerMetrics
from signaling.ratelimit import TokenBucketLimiter
from signaling.webhook_sender import WebhookSender

log = logging.getLogger(__name__)


def _freeze_loaded_objects() -> None:
    """Take what start-up loaded out of the collector's sight.

    The libraries and the model leave some 400 000 objects that live as long as the server.
    Every full collection walks them all with the GIL held: 0.1-0.3 s on a 2-core box, a
    stall of the event loop in which every call's frames and ``/healthz`` wait. Collected
    once here (start-up garbage, such as loading temporaries, is not kept), then frozen, a
    full collection walks only what calls create.
    """
    gc.collect()
    gc.freeze()


def _one_blas_thread() -> None:
    """Run numpy's BLAS (OpenBLAS) on the thread that calls it.

    The engine lanes call it for each decode's log-mel (faster-whisper's filter bank is a
    matrix product). OpenBLAS starts a worker per core and each one spins after every
    product, waiting for more: on a 2-core box that thread took about a third of the
    server's CPU in a call (27-29 % of a core against 16-19 % with it gone,
    ``bench/latency.py --audio read60.wav``, docs/benchmarks.md), and finals came no
    later. The server's parallelism is its lanes and calls, not one matrix split in two.
    """
    threadpool_limits(limits=1, user_api="blas")


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
    calls: dict[str, WebRtcCall] = field(default_factory=dict)
    #: ``/v1/realtime`` WebSocket sessions, by session id.
    sockets: dict[str, RealtimeSocket] = field(default_factory=dict)
    #: Twilio media streams, by stream id (each holds one call slot per track).
    twilio_streams: dict[str, TwilioStream] = field(default_factory=dict)
    #: The events of each phone call with a stream running, by call SID.
    hubs: dict[str, CallHub] = field(default_factory=dict)
    #: ``telephony.webhook_url``'s queue; ``None`` without one.
    webhook: WebhookSender | None = field(init=False)
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
        self.metrics = ServerMetrics(lambda: self.live_sessions, lambda: self.worker)
        per_minute = self.config.limits.offers_per_minute_per_ip
        self.offer_limiter = TokenBucketLimiter(per_minute) if per_minute else None
        per_minute = self.config.limits.patches_per_minute_per_ip
        self.patch_limiter = TokenBucketLimiter(per_minute) if per_minute else None
        telephony = self.config.telephony
        self.webhook = (
            WebhookSender(telephony, self.metrics.webhook_outcome)
            if telephony.webhook_url
            else None
        )

    async def load(self, engine: Engine | None = None) -> None:
        """Load the VAD and the engine (or use ``engine``), warm up, become ready."""
        _one_blas_thread()
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
        _freeze_loaded_objects()
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
    def call_slot(self, new: bool = True, engine_check: bool = True) -> Iterator[None]:
        """Hold a call slot while an offer is answered, so that offers in flight count against
        ``limits.max_calls`` too; ``new=False`` for a restart, whose peer takes its old one's
        slot. Released however the offer ends (answered, refused, or cancelled).

        With a streaming engine, a new call is also refused while the engine takes no more
        streams (``engine_check=False``: the session refuses instead, with an ``error``)."""
        limit = self.config.limits.max_calls
        if new and self.live_sessions + self.reserved >= limit:
            raise ApiError(
                503,
                "too_many_calls",
                f"the server holds its maximum of {limit} calls",
                type_="server_error",
                headers={"Retry-After": "10"},
            )
        engine = self.worker.engine if self.worker is not None else None
        if new and engine_check and isinstance(engine, StreamingEngine) and not engine.admits():
            raise ApiError(
                503,
                "too_many_calls",
                "the engine keeps up with no more streams",
                type_="server_error",
                headers={"Retry-After": "10"},
            )
        self.reserved += 1
        try:
            yield
        finally:
            self.reserved -= 1

    def add_call(self, pc_id: str, session: WebRtcCall, record: CallRecord) -> None:
        self.calls[pc_id] = session
        self.records[pc_id] = record

    @property
    def live_sessions(self) -> int:
        """Calls, WebSocket sessions and Twilio tracks: all count against
        ``limits.max_calls``."""
        streams = sum(s.weight for s in self.twilio_streams.values())
        return len(self.calls) + len(self.sockets) + streams

    def add_socket(self, socket: RealtimeSocket) -> None:
        self.sockets[socket.id] = socket

    def forget_socket(self, socket: RealtimeSocket) -> None:
        if self.sockets.get(socket.id) is socket:
            del self.sockets[socket.id]

    def forget(self, session: WebRtcCall) -> None:
        for pc_id, known in list(self.calls.items()):
            if known is session:
                del self.calls[pc_id]
                self.records.pop(pc_id, None)

    def _sessions(self) -> list[WebRtcCall | RealtimeSocket | TwilioStream]:
        return [*self.calls.values(), *self.sockets.values(), *self.twilio_streams.values()]

    async def drain(self, grace_s: float) -> None:
        """Graceful stop (SIGTERM): refuse new calls, give the open ones ``grace_s`` to
        finish their utterances (their ``completed`` still reaches the client) before they
        are closed, and let HTTP requests in flight finish within the same grace."""
        self.status = "stopping"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        sessions = self._sessions()
        log.info("draining: %d session(s), up to %.1f s", len(sessions), grace_s)
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
        sessions = self._sessions()
        if sessions:
            await asyncio.gather(*(s.close("server_shutdown") for s in sessions))
        if self.webhook is not None:
            await self.webhook.close()  # after the calls: their last completed are queued
        if self.worker is not None:
            await self.worker.close()
        self.executor.shutdown(wait=True)


STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)
