"""HTTP routes: WebRTC offer/answer and trickle ICE (Pipecat SmallWebRTC shape), page config,
health, readiness, Prometheus metrics, and the static page."""

from __future__ import annotations

import logging
import math
from typing import Any

from aiohttp import web
from aiortc import RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from agent.config import Config, WebRTCConfig
from agent.peer import ice_servers_for_browser, new_peer_connection, set_audio_jitter_prefetch
from agent.session import CallSession
from signaling.app import STATE, ServerState
from signaling.errors import ApiError, json_object
from signaling.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from signaling.transcriptions import setup_transcription_routes

log = logging.getLogger(__name__)

MAX_CANDIDATES = 64


def setup_routes(app: web.Application, config: Config) -> None:
    app.router.add_post("/api/offer", offer)
    app.router.add_patch("/api/offer", add_candidates)
    app.router.add_get("/api/config", page_config)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    setup_transcription_routes(app)
    web_path = config.server.web_path
    if web_path.is_dir():
        # Only the page's own files, by exact name: no directory walking, and /api/* paths
        # keep their 405s instead of being swallowed by a catch-all static route.
        files = {p.name: p for p in web_path.iterdir() if p.is_file()}

        async def page_file(request: web.Request) -> web.StreamResponse:
            name = request.match_info.get("name") or "index.html"
            path = files.get(name)
            if path is None:
                raise ApiError(404, "not_found", f"no such page file: {name}")
            return web.FileResponse(path)

        app.router.add_get("/", page_file)
        app.router.add_get("/{name}", page_file)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if (
        request.content_length is not None
        and request.content_length > request.app[STATE].config.server.max_body_bytes
    ):
        raise ApiError(413, "request_too_large", "request body too large")
    return json_object(await request.read())


def _ready_state(request: web.Request) -> ServerState:
    state = request.app[STATE]
    state.require_ready()
    return state


async def offer(request: web.Request) -> web.Response:
    """``POST /api/offer``: a new call, or ``pc_id`` (+ ``restart_pc``) for an existing one."""
    _check_offer_rate(request)
    body = await _json_body(request)
    state = _ready_state(request)
    sdp, kind = body.get("sdp"), body.get("type")
    if not isinstance(sdp, str) or not sdp.strip():
        raise ApiError(400, "invalid_sdp", "field 'sdp' must be a non-empty string")
    if kind != "offer":
        raise ApiError(400, "invalid_type", "field 'type' must be 'offer'")
    if "v=0" not in sdp or "m=audio" not in sdp:
        raise ApiError(400, "invalid_sdp", "the SDP offer has no audio media section")
    pc_id = body.get("pc_id")
    if pc_id is not None and not isinstance(pc_id, str):
        raise ApiError(400, "invalid_value", "field 'pc_id' must be a string")
    description = RTCSessionDescription(sdp=sdp, type="offer")

    if pc_id is not None:
        existing = state.calls.get(pc_id)
        if existing is None:
            raise ApiError(404, "unknown_pc_id", f"no call with pc_id {pc_id!r}")
        if not body.get("restart_pc"):
            # Renegotiation on the same peer (tracks added or changed by the client).
            answer = await _answer(existing.pc, description, state.config.webrtc)
            return web.json_response({"sdp": answer.sdp, "type": answer.type, "pc_id": pc_id})
        # Restart: the old peer is closed (its open utterance flushed) and replaced by a
        # new one under the same pc_id, as Pipecat's SmallWebRTC does.
        await existing.close("restarted")
    elif len(state.calls) >= state.config.limits.max_calls:
        raise ApiError(
            503,
            "too_many_calls",
            f"the server holds its maximum of {state.config.limits.max_calls} calls",
            type_="server_error",
            headers={"Retry-After": "10"},
        )

    pc = new_peer_connection(state.config.webrtc)
    session = CallSession(pc, state.deps(), on_closed=state.forget)
    try:
        answer = await _answer(pc, description, state.config.webrtc)
    except ApiError:
        await session.close("bad_offer")
        raise
    new_id = pc_id or session.id
    state.add_call(new_id, session)
    session.start()
    state.metrics.calls_started.inc()
    log.info("call %s started from %s", new_id, request.remote)
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "pc_id": new_id})


def _check_offer_rate(request: web.Request) -> None:
    """``limits.offers_per_minute_per_ip``: every offer attempt takes a token, good or bad."""
    limiter = request.app[STATE].offer_limiter
    if limiter is None:
        return
    wait = limiter.take(request.remote or "unknown")
    if wait > 0:
        raise ApiError(
            429,
            "rate_limit_exceeded",
            "too many offers from this address; retry later",
            type_="rate_limit_error",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


async def _answer(
    pc: Any, description: RTCSessionDescription, config: WebRTCConfig
) -> RTCSessionDescription:
    try:
        await pc.setRemoteDescription(description)
    except Exception as exc:  # aiortc raises ValueError, KeyError... for bad SDP
        log.info("unusable SDP offer: %r", exc)  # aiortc internals stay in the log
        raise ApiError(400, "invalid_sdp", "the SDP offer could not be applied") from None
    set_audio_jitter_prefetch(pc, config.jitter_prefetch_frames)
    try:
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except Exception as exc:
        log.info("cannot answer SDP offer: %r", exc)
        raise ApiError(400, "invalid_sdp", "the SDP offer could not be answered") from None
    local = pc.localDescription
    assert local is not None
    return local  # type: ignore[no-any-return]


async def add_candidates(request: web.Request) -> web.Response:
    """``PATCH /api/offer``: trickle ICE candidates for an existing call."""
    body = await _json_body(request)
    state = request.app[STATE]
    pc_id = body.get("pc_id")
    if not isinstance(pc_id, str):
        raise ApiError(400, "invalid_value", "field 'pc_id' must be a string")
    candidates = body.get("candidates")
    if not isinstance(candidates, list) or len(candidates) > MAX_CANDIDATES:
        raise ApiError(
            400, "invalid_value", f"field 'candidates' must be a list of at most {MAX_CANDIDATES}"
        )
    session = state.calls.get(pc_id)
    if session is None:
        raise ApiError(404, "unknown_pc_id", f"no call with pc_id {pc_id!r}")
    parsed = []
    for i, entry in enumerate(candidates):
        if not isinstance(entry, dict) or not isinstance(entry.get("candidate"), str):
            raise ApiError(400, "invalid_candidate", f"candidates[{i}] needs a string 'candidate'")
        line = entry["candidate"].strip()
        if not line:
            continue  # end-of-candidates marker
        try:
            candidate = candidate_from_sdp(line.removeprefix("candidate:"))
        except (ValueError, IndexError, KeyError, AssertionError):
            # aiortc's parser signals a malformed line with a bare assert, among others.
            raise ApiError(
                400, "invalid_candidate", f"candidates[{i}] is not an ICE candidate line"
            ) from None
        mid, index = entry.get("sdp_mid"), entry.get("sdp_mline_index")
        candidate.sdpMid = mid if isinstance(mid, str) else None
        candidate.sdpMLineIndex = index if isinstance(index, int) else None
        parsed.append(candidate)
    for candidate in parsed:
        try:
            await session.pc.addIceCandidate(candidate)
        except Exception as exc:
            raise ApiError(400, "invalid_candidate", f"candidate rejected: {exc}") from None
    return web.Response(status=204)


async def page_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.worker.engine.name if state.worker is not None else None
    return web.json_response(
        {
            "ice_servers": ice_servers_for_browser(state.config.webrtc),
            "data_channel": state.config.webrtc.data_channel,
            "engine": engine,
            "ready": state.status == "ready",
        }
    )


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"status": "ok", "calls": len(state.calls)})


async def readyz(request: web.Request) -> web.Response:
    """200 when calls can be served well. ``degraded`` (503): an engine call passed the
    watchdog and has not returned; calls are still accepted on a fresh engine thread, but a
    GPU engine that stays wedged needs a restart."""
    state = request.app[STATE]
    status: str = state.status
    body: dict[str, Any] = {"status": status}
    if state.worker is not None:
        body["engine"] = state.worker.engine.name
        if status == "ready" and state.worker.degraded:
            status = body["status"] = "degraded"
            body["engine_timeouts"] = state.worker.timeouts
    if state.error:
        body["error"] = state.error
    return web.json_response(body, status=200 if status == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format (behind the bearer token when ``server.auth_tokens`` is set)."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})
