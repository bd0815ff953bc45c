"""Property-based fuzzing of everything a client can send: ``POST``/``PATCH /api/offer``
bodies, data-channel messages (the parser, then a live channel) and
``/v1/audio/transcriptions`` bodies. The property: never a 500 or a stack trace, always the
JSON error shape, and the server (and a live call) still answers afterwards.

The server and one live call run on an event loop in a background thread, so Hypothesis can
drive them from plain synchronous tests. Nothing leaves 127.0.0.1: fuzzed ICE candidates and
SDP candidate lines that would name another address are dropped or rewritten, and no string
sent to the file endpoint contains ``:`` (so no URL is ever fetched).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.sdp import candidate_from_sdp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent import events
from agent.config import WebRTCConfig
from agent.errors import ProtocolError
from agent.transports.webrtc_peer import rtc_configuration
from signaling.app import RunningServer, start_server
from tests.conftest import make_config
from tests.integration.test_robustness import Echo
from tests.support.audio_files import wav_bytes
from tests.unit.test_audio_file import AIFF_1HZ, WAV_BOMBS
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient

T = TypeVar("T")
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays deterministic
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ERROR_STATUSES = {400, 401, 403, 404, 405, 413, 415, 429, 503}

# The hostile-input probe's findings, kept in the corpus so no change brings them back.
#: 200 KB of nested arrays: a RecursionError in json.loads, once a 500 or a dead call.
DEEP_JSON = b"[" * 200_000
#: Nested just under the 64 KiB data-channel message limit.
DEEP_MESSAGE = "[" * 60_000
#: Files FFmpeg would open as a playlist of server files or as an RTP session on
#: 127.0.0.1 (port 9, discard: nothing is sent there since the server refuses both).
HOSTILE_FILES = [
    b"ffconcat version 1.0\nfile tests/data/beckett.wav\n",
    b"ffconcat version 1.0\nfile /etc/hostname\n",
    b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio 9 RTP/AVP 0\n",
    *WAV_BOMBS.values(),
    AIFF_1HZ,
]


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    server: RunningServer
    http: aiohttp.ClientSession
    client: RealtimeClient
    offer_sdp: str

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, f"{self.server.url}{path}", **kwargs) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                assert resp.content_type == "application/json", (resp.status, raw[:200])
                body = json.loads(raw)
                assert set(body) == {"error"} and set(body["error"]) == {"type", "code", "message"}
                assert "Traceback" not in body["error"]["message"]
                return resp.status, body
            return resp.status, raw

    async def healthy(self) -> bool:
        async with self.http.get(f"{self.server.url}/healthz") as resp:
            return resp.status == 200


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-loop", daemon=True)
    thread.start()

    async def setup() -> Harness:
        config = make_config(
            VAD__KIND="energy",
            AUDIO__IDLE_TIMEOUT_S="1",
            LIMITS__OFFERS_PER_MINUTE_PER_IP="0",
            LIMITS__MAX_CALLS="16",
        )
        server = await start_server(config, engine=Echo())
        http = aiohttp.ClientSession()
        client = RealtimeClient(server.url)
        # Ten minutes of silence keeps the live call up (and idle) while it is fuzzed.
        await client.connect(ArrayAudioTrack(np.zeros(16000 * 600, np.float32)))
        pc = RTCPeerConnection(rtc_configuration(WebRTCConfig()))
        pc.addTransceiver("audio", direction="sendonly")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()  # only its SDP is needed: fuzzed calls never connect
        return Harness(loop, server, http, client, sdp)

    h = asyncio.run_coroutine_threadsafe(setup(), loop).result(60)
    try:
        yield h
    finally:

        async def teardown() -> None:
            await h.client.close()
            await h.http.close()
            await h.server.stop()

        asyncio.run_coroutine_threadsafe(teardown(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


# -- strategies -----------------------------------------------------------------------------

SAFE_TEXT = st.text(max_size=40).filter(lambda s: ":" not in s)
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), SAFE_TEXT
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SAFE_TEXT, inner, max_size=4),
    max_leaves=12,
)


def _loopback_only(line: str) -> bool:
    """False for an ICE candidate line that parses and names a non-loopback host."""
    try:
        candidate = candidate_from_sdp(line.strip().removeprefix("a=").removeprefix("candidate:"))
    except Exception:
        return True  # the server refuses it before any packet
    try:
        return ipaddress.ip_address(candidate.ip).is_loopback
    except ValueError:
        return False  # a host name (mDNS ".local", DNS): would be resolved


@st.composite
def mutated_sdp(draw: st.DrawFn, base: str) -> str:
    lines = base.split("\r\n")
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        op = draw(st.sampled_from(["drop", "dup", "replace", "insert", "chars", "cut"]))
        if op == "drop" and lines:
            del lines[i]
        elif op == "dup" and lines:
            lines.insert(i, lines[i])
        elif op == "replace" and lines:
            lines[i] = draw(st.text(max_size=60))
        elif op == "insert":
            lines.insert(i, draw(st.text(max_size=60)))
        elif op == "chars" and lines and lines[i]:
            j = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:j] + draw(st.text(min_size=1, max_size=3)) + lines[i][j + 1 :]
        elif op == "cut":
            lines = lines[:i]
    return "\r\n".join(line for line in lines if "candidate" not in line or _loopback_only(line))


CANDIDATE_LINE = st.one_of(
    st.builds(
        "candidate:{} {} {} {} 127.0.0.1 {} typ {}{}".format,
        st.text("abc0123", max_size=8),
        st.integers(-1, 300),
        st.sampled_from(["udp", "tcp", "UDP", "sctp", ""]),
        st.integers(-(2**33), 2**33),
        st.integers(-5, 70000),
        st.sampled_from(["host", "srflx", "relay", "prflx", "bogus", ""]),
        st.sampled_from(["", " generation 0", " tcptype active", " raddr", " ufrag x y z"]),
    ),
    st.text(max_size=80).filter(_loopback_only),
)


@st.composite
def offer_bodies(draw: st.DrawFn, base_sdp: str) -> Any:
    """Mostly a real offer with a few lines mutated (what reaches aiortc's SDP parser);
    sometimes any JSON value or raw bytes."""
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return draw(JSON)
    if shape == 1:
        return draw(st.binary(max_size=600))
    body: dict[str, Any] = {
        "sdp": draw(mutated_sdp(base_sdp)) if shape > 2 else draw(JSON),
        "type": "offer" if shape > 3 else draw(JSON),
    }
    for key in ("pc_id", "restart_pc", "request_data"):
        if draw(st.integers(0, 4)) == 0:
            body[key] = draw(SAFE_TEXT | JSON)
    return body


# -- HTTP signalling ------------------------------------------------------------------------


def _body(value: Any) -> dict[str, Any]:
    if isinstance(value, bytes):
        return {"data": value, "headers": {"Content-Type": "application/json"}}
    return {"json": value}


def test_fuzz_post_offer(harness: Harness) -> None:
    seen: list[int] = []

    @FUZZ
    @given(body=offer_bodies(harness.offer_sdp))
    @example(body=DEEP_JSON)
    @example(body=b'{"type": "offer", "sdp": ' + DEEP_JSON + b"}")
    def check(body: Any) -> None:
        status, answer = harness.run(harness.request("POST", "/api/offer", **_body(body)))
        seen.append(status)
        assert status == 200 or status in ERROR_STATUSES, (status, answer)
        if status == 200:
            parsed = json.loads(answer)
            assert parsed["type"] == "answer" and parsed["sdp"] and parsed["pc_id"]
            # A call from a mutated but usable offer: it must close cleanly too.
            session = harness.server.state.calls[parsed["pc_id"]]
            harness.run(session.close("fuzz"))
            assert parsed["pc_id"] not in harness.server.state.calls
        assert harness.run(harness.healthy())

    check()
    assert seen.count(200) >= 10  # mutated offers do reach aiortc and make calls


def test_fuzz_patch_offer(harness: Harness) -> None:
    live = harness.client.pc_id
    assert live is not None
    candidate = st.fixed_dictionaries(
        {"candidate": CANDIDATE_LINE},
        optional={"sdp_mid": st.sampled_from(["0", "1"]) | JSON, "sdp_mline_index": JSON},
    )

    @st.composite
    def bodies(draw: st.DrawFn) -> Any:
        """Mostly candidates for the live call (what reaches aioice); sometimes anything."""
        shape = draw(st.integers(0, 9))
        if shape == 0:
            return draw(JSON)
        if shape == 1:
            return draw(st.binary(max_size=300))
        return {
            "pc_id": live if shape > 2 else draw(SAFE_TEXT | JSON),
            "candidates": draw(st.lists(candidate, max_size=3) if shape > 3 else JSON),
        }

    seen: list[int] = []

    @FUZZ
    @given(body=bodies())
    @example(body=DEEP_JSON)
    @example(body={"pc_id": "not-a-call", "candidates": [{"candidate": "x"}] * 64})
    def check(body: Any) -> None:
        status, answer = harness.run(harness.request("PATCH", "/api/offer", **_body(body)))
        assert status == 204 or status in ERROR_STATUSES, (status, answer)
        seen.append(status)
        assert harness.run(harness.healthy())

    check()
    assert seen.count(204) >= 5  # fuzzed candidates do reach the live peer
    assert live in harness.server.state.calls  # the fuzzed call is still up


# -- data channel ---------------------------------------------------------------------------

CLIENT_TYPES = st.sampled_from(
    [
        "session.update",
        "transcription_session.update",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "response.create",
        "",
    ]
)
SESSION = st.fixed_dictionaries(
    {},
    optional={
        "input_audio_transcription": st.one_of(
            JSON, st.fixed_dictionaries({}, optional={"language": JSON, "prompt": JSON})
        ),
        "turn_detection": st.one_of(
            JSON,
            st.fixed_dictionaries(
                {},
                optional={
                    "type": st.sampled_from(["server_vad", "semantic_vad"]) | JSON,
                    "threshold": JSON,
                    "prefix_padding_ms": JSON,
                    "silence_duration_ms": JSON,
                },
            ),
        ),
        "include_interim": JSON,
        "audio": JSON,
    },
)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"type": CLIENT_TYPES | JSON},
        optional={"event_id": JSON, "session": st.one_of(SESSION, JSON)},
    ).map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
)


@FUZZ
@given(raw=MESSAGE | st.integers(65_000, 70_000).map(lambda n: '{"type": "' + "a" * n))
@example(raw=DEEP_JSON)
@example(raw=DEEP_MESSAGE)
def test_fuzz_client_event_parser(raw: str | bytes) -> None:
    try:
        parsed = events.parse_client_event(raw)
    except ProtocolError as exc:
        assert exc.code and str(exc)
        return
    assert isinstance(parsed, events.SessionUpdate | events.Commit | events.Clear)


def test_fuzz_live_data_channel(harness: Harness) -> None:
    client = harness.client
    sentinel = 0

    async def exchange(messages: list[str | bytes]) -> None:
        nonlocal sentinel
        for message in messages:
            if isinstance(message, bytes):
                assert client.channel is not None
                client.channel.send(message)
            else:
                client.send_raw(message)
        # The call still applies a valid update after whatever came before.
        sentinel += 1
        client.send(
            {
                "type": "session.update",
                "session": {"input_audio_transcription": {"prompt": f"s{sentinel}"}},
            }
        )
        while True:
            ev = await client.next_event("session.updated", timeout=10)
            prompt = ev.event["session"]["input_audio_transcription"]["prompt"]
            if prompt == f"s{sentinel}":
                return

    @settings(FUZZ, max_examples=60)
    @given(messages=st.lists(MESSAGE, min_size=1, max_size=5))
    @example(messages=[DEEP_MESSAGE])
    @example(messages=['{"type": "' + "x" * 60_000 + '"}'] * 4)  # echoed back, truncated
    def check(messages: list[str | bytes]) -> None:
        harness.run(exchange(messages))

    check()
    assert client.pc_id in harness.server.state.calls
    assert harness.run(harness.healthy())


# -- file transcription ---------------------------------------------------------------------

FORM_FIELDS = st.dictionaries(
    st.sampled_from(
        [
            "model",
            "language",
            "prompt",
            "response_format",
            "timestamp_granularities[]",
            "stream",
            "temperature",
            "file_url",
        ]
    ),
    st.sampled_from(["json", "text", "srt", "vtt", "verbose_json", "true", "en", "word"])
    | SAFE_TEXT,
    max_size=4,
)
AUDIO_BYTES = st.one_of(
    st.binary(max_size=2000),
    st.integers(0, 2000).map(
        lambda n: wav_bytes((np.sin(np.arange(n) / 5) * 0.3).astype(np.float32))
    ),
    st.tuples(st.binary(max_size=64), st.integers(0, 40)).map(
        lambda t: wav_bytes(np.zeros(800, np.float32))[: t[1]] + t[0]
    ),
    st.sampled_from(HOSTILE_FILES),
)


@st.composite
def transcription_requests(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["multipart", "multipart", "json", "form", "raw"]))
    if kind == "multipart":
        form = aiohttp.FormData()
        for key, value in draw(FORM_FIELDS).items():
            if key != "file_url" or draw(st.booleans()):
                form.add_field(key, value)
        if draw(st.integers(0, 3)):
            form.add_field(
                "file",
                draw(AUDIO_BYTES),
                filename=draw(st.sampled_from(["a.wav", "b.mp3", "c", "x.ogg"])),
                content_type=draw(st.sampled_from(["audio/wav", "application/octet-stream"])),
            )
        return {"data": form}
    if kind == "json":
        body = draw(st.dictionaries(SAFE_TEXT, JSON, max_size=3))
        body.update(draw(FORM_FIELDS))
        if draw(st.booleans()):
            import base64

            body["audio"] = draw(
                st.one_of(AUDIO_BYTES.map(lambda b: {"data": base64.b64encode(b).decode()}), JSON)
            )
        return {"json": body}
    if kind == "form":
        return {"data": draw(FORM_FIELDS)}
    ctype = draw(st.sampled_from(["application/json", "text/plain", "multipart/form-data", ""]))
    return {"data": draw(st.binary(max_size=500)), "headers": {"Content-Type": ctype}}


def test_fuzz_file_transcription(harness: Harness) -> None:
    path = "/v1/audio/transcriptions"
    status, _ = harness.run(harness.request("POST", path))
    if status == 404:
        pytest.skip(f"{path} is not served by this build")

    @settings(FUZZ, max_examples=100)
    @given(kwargs=transcription_requests())
    @example(kwargs={"data": DEEP_JSON, "headers": {"Content-Type": "application/json"}})
    def check(kwargs: dict[str, Any]) -> None:
        status, answer = harness.run(harness.request("POST", path, **kwargs), timeout=60)
        assert status == 200 or status in ERROR_STATUSES, (status, answer)
        assert harness.run(harness.healthy())

    for hostile in HOSTILE_FILES:  # each one surely tried, not only when drawn
        check = example(kwargs={"data": _upload(hostile)})(check)
    check()


def _upload(data: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("file", data, filename="a.wav", content_type="audio/wav")
    return form
