"""Phone calls through Twilio: the TwiML webhook, the media stream, the call's event feed.

- ``POST /v1/twilio/voice``: point a Twilio number's voice webhook here; the answer forks the
  call's audio to the media stream (``signaling.twiml``), then runs
  ``telephony.twiml_after_start``.
- ``GET /v1/twilio/media-stream`` (WebSocket): Twilio's Media Stream, one
  ``agent.transports.twilio.TwilioStream``; admitted before the upgrade as far as Twilio
  lets us (``signaling.twilio_auth``), then at its ``start``. Each track is a session and
  counts against ``limits.max_calls`` with every other call.
- ``GET /v1/calls/{callSid}/events`` (WebSocket): the call's OpenAI Realtime transcription
  events (with ``track`` and ``call_sid``), for any holder of a bearer token (the security
  middleware checks it), several at once; one that joins late first gets the call's
  completed items so far. The call must have a stream running (else 404).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from aiohttp import WSMsgType, web

from agent.call_hub import CallHub, Subscriber
from agent.transports.twilio import (
    CLOSE_TRY_LATER,
    MAX_MESSAGE_BYTES,
    StreamHooks,
    StreamRefused,
    TwilioStream,
)
from agent.transports.websocket import WebSocketSink
from agent.twilio_messages import Start
from signaling import twiml
from signaling.errors import ApiError
from signaling.realtime import HEARTBEAT_S, answer_protocols, check_origin
from signaling.state import STATE, ServerState
from signaling.twilio_auth import TwilioAuth

log = logging.getLogger(__name__)

MEDIA_PATH = "/v1/twilio/media-stream"
VOICE_PATH = "/v1/twilio/voice"
EVENTS_PATH = "/v1/calls/{call_sid}/events"
#: How long a subscriber's socket waits for its last events to leave as it closes.
SUBSCRIBER_FLUSH_S = 2.0
#: A subscriber only listens: what it sends is read and dropped, in small messages.
SUBSCRIBER_MAX_MESSAGE_BYTES = 4096

TWILIO_AUTH: web.AppKey[TwilioAuth] = web.AppKey("twilio_auth", TwilioAuth)


def setup_twilio_routes(app: web.Application) -> None:
    app[TWILIO_AUTH] = TwilioAuth(app[STATE].config)
    app.router.add_post(VOICE_PATH, voice)
    app.router.add_get(MEDIA_PATH, media_stream)
    app.router.add_get(EVENTS_PATH, call_events)


# -- the TwiML webhook ----------------------------------------------------------------------


async def voice(request: web.Request) -> web.Response:
    auth = request.app[TWILIO_AUTH]
    parameters = await auth.check_webhook(request)
    state = request.app[STATE]
    state.require_ready()
    body = twiml.start_stream(
        auth.stream_url(request, MEDIA_PATH), state.config.telephony.twiml_after_start, parameters
    )
    call_sid = (await request.post()).get("CallSid", "")
    log.info("TwiML for call %s", call_sid, extra={"call_sid": str(call_sid)})
    return web.Response(text=body, content_type=twiml.CONTENT_TYPE)


# -- the media stream -----------------------------------------------------------------------


async def media_stream(request: web.Request) -> web.StreamResponse:
    auth = request.app[TWILIO_AUTH]
    authorized = auth.check_stream_upgrade(request)
    state = request.app[STATE]
    state.require_ready()
    # Reserved before the first await: a burst of upgrades cannot get past max_calls.
    with state.call_slot():
        ws = web.WebSocketResponse(
            heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES, compress=False
        )
        if not ws.can_prepare(request).ok:
            raise ApiError(400, "websocket_required", f"{MEDIA_PATH} is a WebSocket endpoint")
        await ws.prepare(request)
        hooks = StreamHooks(
            on_start=lambda stream, start: _admit(state, auth, authorized, start),
            on_closed=lambda stream: _forget(state, stream),
        )
        stream = TwilioStream(ws, state.deps(), hooks)
        state.twilio_streams[stream.id] = stream
    log.info("stream %s: WebSocket from %s", stream.id, request.remote)
    # Shielded: a vanished Twilio cancels this handler, but the stream still flushes its
    # open utterances; the server state closes it at shutdown.
    await asyncio.shield(asyncio.ensure_future(stream.run()))
    return ws


def _admit(state: ServerState, auth: TwilioAuth, authorized: bool, start: Start) -> CallHub:
    """A stream's ``start``: its token (when the upgrade had none), a call slot for each
    track beyond the one its upgrade took, then the call's hub."""
    if not authorized and not auth.start_token_ok(start.custom_parameters):
        raise StreamRefused(
            "unauthorized",
            'a valid token is required: <Parameter name="token" value="..."/> in <Stream>',
        )
    extra = len(start.tracks) - 1
    limit = state.config.limits.max_calls
    if extra and state.live_sessions + state.reserved + extra > limit:
        raise StreamRefused(
            "too_many_calls", f"the server holds its maximum of {limit} calls", CLOSE_TRY_LATER
        )
    hub = state.hubs.get(start.call_sid)
    if hub is None:
        hub = CallHub(
            start.call_sid,
            replay_limit=state.config.limits.event_queue,
            max_subscribers=state.config.telephony.max_subscribers,
            on_completed=state.webhook.enqueue if state.webhook is not None else None,
            observer=state.metrics,
        )
        state.hubs[start.call_sid] = hub
    hub.streams += 1
    state.metrics.twilio_streams.inc()
    state.metrics.calls_started.inc(len(start.tracks))
    return hub


def _forget(state: ServerState, stream: TwilioStream) -> None:
    if state.twilio_streams.get(stream.id) is stream:
        del state.twilio_streams[stream.id]
    hub = stream.hub
    if hub is None:
        return
    hub.streams -= 1
    if hub.streams == 0:
        hub.close()
        if state.hubs.get(hub.call_sid) is hub:
            del state.hubs[hub.call_sid]


# -- the call's events ------------------------------------------------------------------------


async def call_events(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_origin(request, state.config.server.cors_origins)
    call_sid = request.match_info["call_sid"]
    hub = state.hubs.get(call_sid)
    if hub is None:
        raise ApiError(404, "unknown_call", "no phone call with this SID is being transcribed")
    if hub.subscribers >= hub.max_subscribers:
        raise ApiError(
            503,
            "too_many_subscribers",
            f"this call has its maximum of {hub.max_subscribers} subscribers",
            type_="server_error",
            headers={"Retry-After": "5"},
        )
    ws = web.WebSocketResponse(
        protocols=answer_protocols(request),
        heartbeat=HEARTBEAT_S,
        max_msg_size=SUBSCRIBER_MAX_MESSAGE_BYTES,
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "websocket_required", f"{request.path} is a WebSocket endpoint")
    await ws.prepare(request)
    await _serve_subscriber(ws, hub, state.config.limits.channel_buffer_bytes)
    return ws


async def _serve_subscriber(ws: web.WebSocketResponse, hub: CallHub, limit: int) -> None:
    """Events to ``ws`` until the call ends, the subscriber leaves, or it stops reading."""
    sink = WebSocketSink(ws, limit)
    ended = asyncio.Event()
    subscriber = Subscriber(sink, stop=lambda reason: ended.set())
    try:
        if hub.subscribe(subscriber):
            log.info("call %s: subscriber joined", hub.call_sid, extra={"call_sid": hub.call_sid})
            await _until_either(_read_until_closed(ws), ended.wait())
        hub.unsubscribe(subscriber)
        await sink.flush(SUBSCRIBER_FLUSH_S)
        if not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.close()
    finally:
        hub.unsubscribe(subscriber)
        await sink.close()


async def _read_until_closed(ws: web.WebSocketResponse) -> None:
    while True:
        msg = await ws.receive()
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return


async def _until_either(*coros: Coroutine[Any, Any, Any]) -> None:
    """Until the first of ``coros`` is done; the others are cancelled and awaited."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
