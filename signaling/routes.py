"""HTTP routes: WebRTC offer/answer and trickle ICE (Pipecat SmallWebRTC shape), page config,
health, readiness, Prometheus metrics, and the static page."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import time
from typing import Any

from aiohttp import web
from aiortc import RTCIceCandidate, RTCSessionDescription
from aiortc.sdp import SessionDescription, candidate_from_sdp

from agent.config import Config, WebRTCConfig
from agent.transports.webrtc import WebRtcCall
from agent.transports.webrtc_peer import (
    UdpPortsExhausted,
    new_peer_connection,
    set_audio_jitter_prefetch,
)
from signaling.errors import ApiError, json_object
from signaling.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from signaling.ratelimit import TokenBucketLimiter
from signaling.realtime import setup_realtime_routes
from signaling.state import STATE, CallRecord, ServerState
from signaling.transcriptions import setup_transcription_routes
from signaling.turn_credentials import ice_servers_for_page
from signaling.twilio import setup_twilio_routes

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
    setup_realtime_routes(app)
    setup_twilio_routes(app)
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


def _require_json(request: web.Request) -> None:
    """Without tokens, a signalling body must say ``application/json``: a cross-site form post
    (``text/plain``, sent by any page without a CORS preflight) must not create or touch a
    call. With tokens it cannot carry the ``Authorization`` header, so any type is read.
    Checked once the body has parsed: a malformed body is a 400 ``invalid_json`` either way."""
    if request.app[STATE].config.server.auth_tokens:
        return
    if request.content_type != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "the request body must be Content-Type: application/json"
        )


def _owner(request: web.Request) -> bytes:
    """Who may renegotiate, restart or trickle to a call: the bearer token that created it, or
    the client address when the server has no tokens. A digest: the token is never kept."""
    if request.app[STATE].config.server.auth_tokens:
        # The security middleware has checked this header already.
        _, _, token = request.headers.get("Authorization", "").partition(" ")
        key = "token\0" + token.strip()
    else:
        key = "address\0" + (request.remote or "")
    return hashlib.sha256(key.encode("utf-8")).digest()


def _record(state: ServerState, pc_id: str, owner: bytes) -> CallRecord:
    """The call's record, if ``owner`` created it; someone else's call is as unknown as a
    missing one (the answer does not tell which ``pc_id`` exists)."""
    record = state.records.get(pc_id)
    if record is None or not hmac.compare_digest(record.owner, owner):
        raise ApiError(404, "unknown_pc_id", f"no call with pc_id {pc_id!r}")
    return record


def _session(state: ServerState, pc_id: str, record: CallRecord) -> WebRtcCall:
    """The call's session once its lock is held: it may have ended (or been replaced by a
    failed restart) while this request waited."""
    session = state.calls.get(pc_id)
    if session is None or state.records.get(pc_id) is not record:
        raise ApiError(404, "unknown_pc_id", f"no call with pc_id {pc_id!r}")
    return session


async def offer(request: web.Request) -> web.Response:
    """``POST /api/offer``: a new call, or ``pc_id`` (+ ``restart_pc``) for an existing one.

    Everything an offer holds (its call slot, the ``pc_id`` lock, a new peer) is released
    however it ends: answered, refused, or cancelled because the client went away.
    """
    _check_rate(request, request.app[STATE].offer_limiter, "offers")
    body = await _json_body(request)
    _require_json(request)
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
    owner = _owner(request)
    offered = _offered_candidates(sdp, state.config.limits.candidates_per_call)

    if pc_id is None:
        with state.call_slot():
            record = CallRecord(owner, candidates=offered)
            pc_id, answer = await _start_call(state, None, record, description)
        log.info("call %s started from %s", pc_id, request.remote)
    else:
        record = _record(state, pc_id, owner)
        async with record.lock:
            existing = _session(state, pc_id, record)
            _spend_candidates(record, offered, state.config.limits.candidates_per_call)
            if body.get("restart_pc"):
                # Restart: the old peer is closed (its open utterance flushed) and replaced by
                # a new one under the same pc_id, as Pipecat's SmallWebRTC does.
                with state.call_slot(new=False):
                    await existing.close("restarted")
                    _, answer = await _start_call(state, pc_id, record, description)
                log.info("call %s restarted from %s", pc_id, request.remote)
            else:
                # Renegotiation on the same peer (tracks added or changed by the client).
                answer = await _answer(existing.pc, description, state.config.webrtc)
                record.media = _remote_media(sdp)
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "pc_id": pc_id})


async def _start_call(
    state: ServerState, pc_id: str | None, record: CallRecord, description: RTCSessionDescription
) -> tuple[str, RTCSessionDescription]:
    """A new peer and session answering ``description``, registered under ``pc_id`` (a new
    call: the session's id). Every peer made here ends up registered or closed."""
    deps = state.deps()  # before the peer exists: nothing may fail between it and the try
    pc = new_peer_connection(state.config.webrtc)
    session = WebRtcCall(pc, deps, on_closed=state.forget)
    try:
        answer = await _answer(pc, description, state.config.webrtc)
        # Shutdown began meanwhile: it closed the calls it knew and would never see this one.
        state.require_ready()
    except BaseException as exc:
        # Refused, shutting down, or the client gone mid-offer (the handler cancelled):
        # nothing else knows this peer. Shielded: a second cancellation cannot cut it short.
        reason = "bad_offer" if isinstance(exc, ApiError) else "offer_abandoned"
        await asyncio.shield(session.close(reason))
        raise
    new_id = pc_id or session.id
    record.media = _remote_media(description.sdp)
    state.add_call(new_id, session, record)
    session.start()
    state.metrics.calls_started.inc()
    return new_id, answer


def _check_rate(request: web.Request, limiter: TokenBucketLimiter | None, what: str) -> None:
    """``limits.offers_per_minute_per_ip`` / ``patches_per_minute_per_ip``: every attempt
    takes a token, good or bad."""
    if limiter is None:
        return
    wait = limiter.take(request.remote or "unknown")
    if wait > 0:
        raise ApiError(
            429,
            "rate_limit_exceeded",
            f"too many {what} from this address; retry later",
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
        await pc.setLocalDescription(answer)  # gathers the server's ICE candidates
    except UdpPortsExhausted as exc:
        # webrtc.udp_ports is full: refused now, rather than a call with no candidates.
        raise ApiError(
            503, exc.code, str(exc), type_="server_error", headers={"Retry-After": "10"}
        ) from None
    except Exception as exc:
        log.info("cannot answer SDP offer: %r", exc)
        raise ApiError(400, "invalid_sdp", "the SDP offer could not be answered") from None
    local = pc.localDescription
    assert local is not None
    return local  # type: ignore[no-any-return]


def _remote_media(sdp: str) -> tuple[tuple[str, str], ...]:
    """``(mid, ice-ufrag)`` of each media section of an offer aiortc has applied (so its
    parser accepts it), in m-line order: what a trickled candidate must name."""
    media = SessionDescription.parse(sdp).media
    return tuple(
        (m.rtp.muxId or "", (m.ice.usernameFragment if m.ice is not None else None) or "")
        for m in media
    )


async def add_candidates(request: web.Request) -> web.Response:
    """``PATCH /api/offer``: trickle ICE candidates for the caller's own call.

    The server sends STUN checks to every candidate it accepts, so candidates are bounded
    (``limits.candidates_per_call`` over the call's life, ``limits.patches_per_minute_per_ip``)
    and must belong to the call's ICE session; otherwise anyone could aim its checks at any
    address and port.
    """
    state = request.app[STATE]
    _check_rate(request, state.patch_limiter, "trickle requests")
    body = await _json_body(request)
    _require_json(request)
    pc_id = body.get("pc_id")
    if not isinstance(pc_id, str):
        raise ApiError(400, "invalid_value", "field 'pc_id' must be a string")
    candidates = body.get("candidates")
    if not isinstance(candidates, list) or len(candidates) > MAX_CANDIDATES:
        raise ApiError(
            400, "invalid_value", f"field 'candidates' must be a list of at most {MAX_CANDIDATES}"
        )
    record = _record(state, pc_id, _owner(request))
    async with record.lock:
        session = _session(state, pc_id, record)
        parsed = [
            candidate
            for i, entry in enumerate(candidates)
            if (candidate := _candidate(i, entry, record.media)) is not None
        ]
        # Spent before any is added: a request cancelled half-way cannot get them back.
        _spend_candidates(record, len(parsed), state.config.limits.candidates_per_call)
        for candidate in parsed:
            try:
                await session.pc.addIceCandidate(candidate)
            except Exception as exc:
                raise ApiError(400, "invalid_candidate", f"candidate rejected: {exc}") from None
    return web.Response(status=204)


def _offered_candidates(sdp: str, limit: int) -> int:
    """The ``a=candidate`` lines of an offer: the server checks them like trickled ones, so
    they count against the same ``limits.candidates_per_call``."""
    offered = sum(1 for line in sdp.splitlines() if line.strip().startswith("a=candidate:"))
    if offered > limit:
        raise _too_many_candidates(limit, 0)
    return offered


def _spend_candidates(record: CallRecord, count: int, limit: int) -> None:
    if record.candidates + count > limit:
        raise _too_many_candidates(limit, record.candidates)
    record.candidates += count


def _too_many_candidates(limit: int, so_far: int) -> ApiError:
    return ApiError(
        400,
        "too_many_candidates",
        f"a call accepts at most {limit} ICE candidates, in its offers and trickled"
        f" ({so_far} so far)",
    )


def _candidate(i: int, entry: object, media: tuple[tuple[str, str], ...]) -> RTCIceCandidate | None:
    """``candidates[i]`` checked against the call's ICE session; ``None`` when there is
    nothing to add (the end-of-candidates marker, a host name)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("candidate"), str):
        raise ApiError(400, "invalid_candidate", f"candidates[{i}] needs a string 'candidate'")
    line = entry["candidate"].strip()
    if not line:
        return None  # end-of-candidates marker
    try:
        candidate = candidate_from_sdp(line.removeprefix("candidate:"))
    except (ValueError, IndexError, KeyError, AssertionError):
        # aiortc's parser signals a malformed line with a bare assert, among others.
        raise ApiError(
            400, "invalid_candidate", f"candidates[{i}] is not an ICE candidate line"
        ) from None
    index = _media_index(i, entry, media)
    mid, ufrag = media[index]
    # Pipecat's clients send the browser's ``usernameFragment``; a line may carry ``ufrag``.
    for given in (entry.get("usernameFragment"), entry.get("username_fragment"), _ufrag(line)):
        if given is not None and given != ufrag:
            raise ApiError(
                400, "invalid_candidate", f"candidates[{i}] is for another ICE session (ufrag)"
            )
    try:
        ipaddress.ip_address(candidate.ip)
    except ValueError:
        # An mDNS (.local) or DNS name: resolving it would send queries (mDNS multicasts to
        # the LAN) on the client's say-so; its candidates with addresses are enough.
        return None
    candidate.sdpMid = mid or None
    candidate.sdpMLineIndex = index
    return candidate


def _media_index(i: int, entry: dict[str, Any], media: tuple[tuple[str, str], ...]) -> int:
    """The media section of the call's remote description that ``candidates[i]`` names."""
    mid, index = entry.get("sdp_mid"), entry.get("sdp_mline_index")
    mid = mid if isinstance(mid, str) and mid else None
    index = index if isinstance(index, int) and not isinstance(index, bool) else None
    if mid is None and index is None:
        raise ApiError(
            400, "invalid_candidate", f"candidates[{i}] needs 'sdp_mid' or 'sdp_mline_index'"
        )
    mids = [m for m, _ in media]
    if index is None:
        index = mids.index(mid) if mid in mids else -1
    if not 0 <= index < len(media) or (mid is not None and mids[index] != mid):
        raise ApiError(
            400, "invalid_candidate", f"candidates[{i}] names no media section of this call"
        )
    return index


def _ufrag(line: str) -> str | None:
    """The ``ufrag`` extension attribute of a candidate line, if it has one."""
    bits = line.split()
    for k in range(8, len(bits) - 1, 2):  # key-value pairs after "typ <type>"
        if bits[k] == "ufrag":
            return bits[k + 1]
    return None


async def page_config(request: web.Request) -> web.Response:
    """``GET /api/config``: what the page needs for a call, TURN credentials minted for it
    (never cached: each call's credentials are its own)."""
    state = request.app[STATE]
    engine = state.worker.engine.name if state.worker is not None else None
    return web.json_response(
        {
            "ice_servers": ice_servers_for_page(state.config.webrtc, time.time()),
            "data_channel": state.config.webrtc.data_channel,
            "engine": engine,
            "ready": state.status == "ready",
        },
        headers={"Cache-Control": "no-store"},
    )


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # Every live session, whatever its transport: the same count as max_calls and /metrics.
    return web.json_response({"status": "ok", "calls": state.live_sessions})


async def readyz(request: web.Request) -> web.Response:
    """200 when calls can be served well. ``degraded`` (503): an engine call passed the
    watchdog and has not returned (calls are still accepted on a fresh engine thread, but a
    GPU engine that stays wedged needs a restart), or no remote transcription server is in
    service (utterances fail at once until one answers a probe)."""
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
