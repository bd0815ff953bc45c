"""``GET /v1/realtime``: OpenAI Realtime transcription sessions over a WebSocket.

What the openai SDK (``client.realtime.connect``, ``client.beta.realtime.connect``),
LiveKit's ``openai.STT(use_realtime=True)`` and Pipecat's ``OpenAIRealtimeSTTService`` open
when pointed at this server by a base URL. Admission happens before the upgrade, so a refused
client gets a plain HTTP answer: 401 without a valid token (``Authorization: Bearer`` or, for
browsers, which cannot set headers on a WebSocket, the ``openai-insecure-api-key.<token>``
subprotocol; checked by ``signaling.security``), 403 for a page from an origin not in
``server.cors_origins``, 400 for an ``intent`` other than transcription, 503 while loading,
stopping or at ``limits.max_calls`` (WebSocket sessions and WebRTC calls together). The
session itself is ``agent.transports.websocket.RealtimeSocket``.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from aiohttp import web

from agent.transports.websocket import RealtimeSocket
from signaling.errors import ApiError
from signaling.security import API_KEY_PROTOCOL
from signaling.state import STATE

log = logging.getLogger(__name__)

PATH = "/v1/realtime"
#: The subprotocol OpenAI's browser clients ask for first; answered when offered.
REALTIME_PROTOCOL = "realtime"
#: WebSocket ping every this many seconds; a client that misses the pong is closed.
HEARTBEAT_S = 20.0


def setup_realtime_routes(app: web.Application) -> None:
    app.router.add_get(PATH, realtime)


async def realtime(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    intent = request.query.get("intent", "transcription")
    if intent != "transcription":
        raise ApiError(
            400,
            "invalid_intent",
            "this server runs transcription sessions only: connect with ?intent=transcription",
        )
    check_origin(request, state.config.server.cors_origins)
    state.require_ready()
    # Reserved before the first await: a burst of upgrades cannot get past max_calls. A
    # streaming engine that takes no more streams is told in the session, as an ``error``.
    with state.call_slot(engine_check=False):
        ws = web.WebSocketResponse(
            protocols=answer_protocols(request),
            heartbeat=HEARTBEAT_S,
            max_msg_size=state.config.limits.ws_max_message_bytes,
            # Appends are small and numerous; compressing them costs CPU for nothing.
            compress=False,
        )
        if not ws.can_prepare(request).ok:
            raise ApiError(400, "websocket_required", f"{PATH} is a WebSocket endpoint")
        await ws.prepare(request)
        socket = RealtimeSocket(ws, state.deps(), on_closed=state.forget_socket)
        state.add_socket(socket)
    state.metrics.calls_started.inc()
    log.info(
        "session %s: WebSocket from %s",
        socket.id,
        request.remote,
        extra={"call_id": socket.id},
    )
    # Shielded: a client that vanishes cancels this handler (handler_cancellation), but its
    # session still flushes the open utterance and drains; the socket owns the task and
    # the server state closes it at shutdown.
    await asyncio.shield(asyncio.ensure_future(socket.run()))
    return ws


def answer_protocols(request: web.Request) -> tuple[str, ...]:
    """The subprotocol to answer with: ``realtime`` if offered, else the first offered that
    is not the token (a browser fails a connection whose offered protocols all go
    unanswered; echoing the token back would put it in another header)."""
    offered = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    if REALTIME_PROTOCOL in offered:
        return (REALTIME_PROTOCOL,)
    plain = [p for p in offered if not p.startswith(API_KEY_PROTOCOL)]
    return tuple(plain[:1]) or tuple(offered[:1])


def check_origin(request: web.Request, allowed: tuple[str, ...]) -> None:
    """A page may open the socket from this server's own origin or a listed one. No
    ``Origin`` (SDKs, servers) is not a browser: the token alone decides."""
    origin = request.headers.get("Origin")
    if not origin or "*" in allowed or origin in allowed:
        return
    if urlsplit(origin).netloc == request.host:
        return
    raise ApiError(
        403, "origin_not_allowed", "this origin may not open a session (server.cors_origins)"
    )
