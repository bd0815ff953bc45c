"""``POST /v1/audio/transcriptions`` end to end: the real server, Silero and the embedded
Whisper engine, over loopback only. Every response format on beckett.wav, the ``openai`` SDK,
a two-minute file, each bad input, and ``file_url`` against a local file server."""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from aiohttp import web

from agent.engines.base import Engine, EngineRequest, EngineResult
from signaling.app import RunningServer, start_server
from signaling.errors import ApiError
from signaling.transcriptions import FileJobs
from tests.conftest import BECKETT, BECKETT_PHRASES, BECKETT_REGIONS, make_config, normalise
from tests.support.audio_files import encode, wav_bytes

pytestmark = pytest.mark.asyncio(loop_scope="module")

PATH = "/v1/audio/transcriptions"
REFERENCE = " ".join(BECKETT_PHRASES)
CUE = re.compile(r"(\d\d):(\d\d):(\d\d)[,.](\d{3}) --> (\d\d):(\d\d):(\d\d)[,.](\d{3})")
TOLERANCE_S = 0.2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(embedded_engine: Engine) -> AsyncIterator[RunningServer]:
    """Default configuration: private URLs refused, 100 MiB uploads."""
    running = await start_server(make_config(), engine=embedded_engine)
    yield running
    await running.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def open_server(embedded_engine: Engine) -> AsyncIterator[RunningServer]:
    """Private URLs allowed (the file server is on 127.0.0.1), small size limits."""
    config = make_config(
        LIMITS__ALLOW_PRIVATE_URLS="true",
        LIMITS__MAX_UPLOAD_BYTES="400000",
        LIMITS__MAX_AUDIO_S="15",
        LIMITS__URL_MAX_REDIRECTS="2",
    )
    running = await start_server(config, engine=embedded_engine)
    yield running
    await running.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def file_server(beckett_audio: npt.NDArray[np.float32]) -> AsyncIterator[str]:
    """A plain aiohttp server on 127.0.0.1 serving audio, redirects and oversized bodies."""
    mp3 = encode(beckett_audio, "mp3")

    async def audio(_request: web.Request) -> web.Response:
        return web.Response(body=mp3, content_type="audio/mpeg")

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked: no Content-Length to trust
        await resp.prepare(request)
        for _ in range(20):
            await resp.write(b"\0" * 50_000)
        await resp.write_eof()
        return resp

    def redirect(to: str) -> Any:
        async def handler(_request: web.Request) -> web.Response:
            raise web.HTTPFound(to)

        return handler

    app = web.Application()
    app.router.add_get("/beckett.mp3", audio)
    app.router.add_get("/redirect", redirect("/beckett.mp3"))
    app.router.add_get("/loop", redirect("/loop"))
    app.router.add_get("/to-file", redirect("file:///etc/passwd"))
    app.router.add_get("/big", big)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def form(data: bytes | None = None, filename: str = "beckett.wav", **fields: str) -> Any:
    body = aiohttp.FormData(default_to_multipart=True)
    if data is not None:
        body.add_field("file", data, filename=filename, content_type="application/octet-stream")
    for key, value in fields.items():
        body.add_field(key.replace("__", "[]"), value)
    return body


async def post(server: RunningServer, **kwargs: Any) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + PATH, **kwargs) as resp:
            return resp.status, resp.content_type, await resp.text()


async def post_error(server: RunningServer, **kwargs: Any) -> tuple[int, dict[str, str]]:
    status, ctype, text = await post(server, **kwargs)
    assert ctype == "application/json", text
    body = json.loads(text)
    assert set(body) == {"error"} and set(body["error"]) == {"type", "code", "message"}
    assert "Traceback" not in body["error"]["message"]
    return status, body["error"]


def cue_times(text: str) -> list[tuple[float, float]]:
    def seconds(h: str, m: str, s: str, ms: str) -> float:
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    return [(seconds(*m.groups()[:4]), seconds(*m.groups()[4:])) for m in CUE.finditer(text)]


def cue_texts(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln and ln != "WEBVTT" and not ln.isdigit()]
    return " ".join(ln for ln in lines if "-->" not in ln)


def assert_beckett_times(times: list[tuple[float, float]]) -> None:
    assert len(times) == len(BECKETT_REGIONS)
    for (start, end), (ref_start, ref_end) in zip(times, BECKETT_REGIONS, strict=True):
        assert abs(start - ref_start) <= TOLERANCE_S, (times, BECKETT_REGIONS)
        assert abs(end - ref_end) <= TOLERANCE_S, (times, BECKETT_REGIONS)


# -- every response format -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "text", "verbose_json", "srt", "vtt"])
async def test_each_response_format(server: RunningServer, fmt: str) -> None:
    status, ctype, text = await post(
        server, data=form(BECKETT.read_bytes(), model="whisper-1", response_format=fmt)
    )
    assert status == 200, text
    if fmt == "json":
        body = json.loads(text)
        assert normalise(body["text"]) == REFERENCE
        assert body["usage"] == {"type": "duration", "seconds": pytest.approx(9.96, abs=0.01)}
    elif fmt == "text":
        assert ctype == "text/plain" and normalise(text) == REFERENCE
    elif fmt == "verbose_json":
        body = json.loads(text)
        assert normalise(body["text"]) == REFERENCE
        assert body["language"] == "en" and body["duration"] == pytest.approx(9.96, abs=0.01)
        assert_beckett_times([(s["start"], s["end"]) for s in body["segments"]])
        assert [normalise(s["text"]) for s in body["segments"]] == BECKETT_PHRASES
    else:
        assert text.startswith("WEBVTT\n\n") == (fmt == "vtt")
        assert_beckett_times(cue_times(text))
        assert normalise(cue_texts(text)) == REFERENCE


async def test_stream_sends_deltas_then_done(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            server.url + PATH, data=form(BECKETT.read_bytes(), stream="true")
        ) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/event-stream"
            raw = await resp.text()
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "transcript.text.done"
    assert normalise("".join(e["delta"] for e in events[:-1])) == REFERENCE
    assert normalise(events[-1]["text"]) == REFERENCE


async def test_multipart_mp3_with_language_and_prompt(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    data = encode(beckett_audio, "mp3")  # 44.1 kHz stereo
    status, _, text = await post(
        server, data=form(data, filename="b.mp3", language="en", prompt="Beckett.")
    )
    assert status == 200, text
    assert normalise(json.loads(text)["text"]) == REFERENCE


# -- JSON bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["plain", "data_url", "mistral_nested"])
async def test_json_base64_bodies(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32], shape: str
) -> None:
    b64 = base64.b64encode(encode(beckett_audio, "ogg")).decode()
    body: dict[str, Any] = {"model": "voxtral-mini-latest", "language": "en"}
    if shape == "plain":
        body["audio"] = b64
    elif shape == "data_url":
        body["audio"] = "data:audio/ogg;base64," + b64
    else:
        body.update(audio={"data": b64}, temperature=0.0)
    status, _, text = await post(server, json=body)
    assert status == 200, text
    assert normalise(json.loads(text)["text"]) == REFERENCE


async def test_mistral_common_transcription_request(server: RunningServer) -> None:
    request_mod = pytest.importorskip("mistral_common.protocol.transcription.request")
    request = request_mod.TranscriptionRequest(
        model="voxtral-mini-latest",
        audio=base64.b64encode(BECKETT.read_bytes()).decode(),
        language="en",
        temperature=0.0,
    )
    status, _, text = await post(server, json=request.model_dump(mode="json"))
    assert status == 200, text
    assert normalise(json.loads(text)["text"]) == REFERENCE


# -- the official openai SDK ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "text", "verbose_json", "srt", "vtt", "stream"])
async def test_openai_sdk(server: RunningServer, fmt: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120
    )
    audio = ("beckett.wav", BECKETT.read_bytes(), "audio/wav")
    async with client:
        if fmt == "stream":
            stream = await client.audio.transcriptions.create(
                model="whisper-1", file=audio, stream=True
            )
            events = [event async for event in stream]
            assert events[-1].type == "transcript.text.done"
            assert {e.type for e in events[:-1]} == {"transcript.text.delta"}
            assert normalise(events[-1].text) == REFERENCE
            return
        result = await client.audio.transcriptions.create(
            model="whisper-1",
            file=audio,
            response_format=fmt,
            **({"timestamp_granularities": ["segment"]} if fmt == "verbose_json" else {}),
        )
    if fmt == "json":
        assert normalise(result.text) == REFERENCE
    elif fmt == "verbose_json":
        assert normalise(result.text) == REFERENCE
        assert_beckett_times([(s.start, s.end) for s in result.segments])
    elif fmt == "text":
        assert normalise(result) == REFERENCE
    else:
        assert_beckett_times(cue_times(result))


# -- long audio -----------------------------------------------------------------------------


async def test_two_minute_file_has_monotonic_times_and_every_word(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    gaps_s = [1.0, 3.0, 6.0, 10.0]  # short pauses and long silences between the readings
    parts, offsets, at = [], [], 0.0
    for k in range(8):
        offsets.append(at)
        gap = np.zeros(int(gaps_s[k % 4] * 16_000), dtype=np.float32)
        parts += [beckett_audio, gap]
        at += (len(beckett_audio) + len(gap)) / 16_000
    audio = wav_bytes(np.concatenate(parts))
    duration = at
    assert 115 <= duration <= 125

    # Packed into pieces of up to 30 s (the fast path for text). Whisper tiny can drop a
    # phrase of such looping text at the end of a dense window, so one miss is tolerated.
    status, _, text = await post(server, data=form(audio, response_format="json"))
    assert status == 200, text
    packed = normalise(json.loads(text)["text"])
    for phrase in BECKETT_PHRASES:
        assert packed.count(phrase) >= 7, packed

    # One piece per speech region: exact text, times in order and on the speech.
    status, _, text = await post(server, data=form(audio, response_format="verbose_json"))
    assert status == 200, text
    body = json.loads(text)
    segments = body["segments"]
    assert normalise(body["text"]) == " ".join([REFERENCE] * 8)
    assert body["duration"] == pytest.approx(duration, abs=0.01)
    assert all(s["start"] < s["end"] for s in segments)
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(segments))
    assert segments[-1]["end"] <= body["duration"]
    expected = [(o + a, o + b) for o in offsets for a, b in BECKETT_REGIONS]
    assert len(segments) == len(expected)
    for seg, (ref_start, ref_end) in zip(segments, expected, strict=True):
        assert abs(seg["start"] - ref_start) <= TOLERANCE_S
        assert abs(seg["end"] - ref_end) <= TOLERANCE_S


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "words"),
    [
        (
            {"data": form(b"not audio at all" * 64)},
            400,
            "invalid_audio",
            "not a supported audio file",
        ),
        ({"data": form(b"")}, 400, "empty_audio", "empty"),
        ({"data": form(wav_bytes(np.zeros(0, np.float32)))}, 400, "empty_audio", "no audio"),
        (
            {"data": form(BECKETT.read_bytes(), response_format="xml")},
            400,
            "invalid_value",
            "response_format must be one of",
        ),
        (
            {"data": form(BECKETT.read_bytes(), timestamp_granularities__="word")},
            400,
            "unsupported_value",
            "word",
        ),
        (
            {"data": form(BECKETT.read_bytes(), stream="true", response_format="srt")},
            400,
            "invalid_value",
            "stream=true",
        ),
        ({"data": form(BECKETT.read_bytes(), language="english")}, 400, "invalid_value", "ISO"),
        ({"data": form(model="whisper-1")}, 400, "missing_audio", "no audio"),
        (
            {"data": form(BECKETT.read_bytes(), file_url="https://example.com/a.wav")},
            400,
            "invalid_value",
            "exactly one",
        ),
        ({"json": {"audio": "/etc/passwd"}}, 400, "path_not_allowed", "server-side file paths"),
        ({"data": form(file="/etc/passwd")}, 400, "path_not_allowed", "server-side file paths"),
        (
            {"data": form(file_url="file:///etc/passwd")},
            400,
            "path_not_allowed",
            "server-side file paths",
        ),
        ({"data": form(file_url="ftp://example.com/a.wav")}, 400, "invalid_url", "http and https"),
        ({"json": {"audio": "%%% not base64 %%%"}}, 400, "invalid_audio", "base64"),
        ({"json": [1, 2]}, 400, "invalid_json", "JSON object"),
        ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, None, "multipart"),
    ],
)
async def test_bad_input_gets_a_clear_json_error(
    server: RunningServer,
    kwargs: dict[str, Any],
    status: int,
    code: str | None,
    words: str,
) -> None:
    got_status, error = await post_error(server, **kwargs)
    assert got_status == status, error
    if code is not None:
        assert error["code"] == code
    assert words in error["message"]


async def test_private_url_is_refused_by_default(server: RunningServer, file_server: str) -> None:
    for url in (file_server + "/beckett.mp3", file_server.replace("127.0.0.1", "localhost")):
        status, error = await post_error(server, data=form(file_url=url))
        assert (status, error["code"]) == (400, "url_not_allowed")
        assert "private, loopback or link-local" in error["message"]


async def test_limits_give_413(open_server: RunningServer) -> None:
    too_big = wav_bytes(np.zeros(16_000 * 14, dtype=np.float32))  # 448 kB > 400 kB
    status, error = await post_error(open_server, data=form(too_big))
    assert (status, error["code"]) == (413, "file_too_large")
    b64 = base64.b64encode(too_big).decode()
    status, error = await post_error(open_server, json={"audio": b64})
    assert (status, error["code"]) == (413, "file_too_large")
    too_long = wav_bytes(np.zeros(8_000 * 20, dtype=np.float32), rate=8_000)  # 20 s > 15 s
    status, error = await post_error(open_server, data=form(too_long))
    assert (status, error["code"]) == (413, "audio_too_long")
    assert "limits.max_audio_s" in error["message"]


async def test_signalling_keeps_its_small_body_limit(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            server.url + "/api/offer",
            data=b"x" * 300_000,
            headers={"Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 413


# -- file_url -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/beckett.mp3", "/redirect"])
async def test_url_fetch_when_private_urls_are_allowed(
    open_server: RunningServer, file_server: str, path: str
) -> None:
    status, _, text = await post(open_server, data=form(file_url=file_server + path))
    assert status == 200, text
    assert normalise(json.loads(text)["text"]) == REFERENCE


async def test_url_fetch_in_a_json_body(open_server: RunningServer, file_server: str) -> None:
    body = {"model": "m", "audio": {"url": file_server + "/beckett.mp3"}, "response_format": "text"}
    status, _, text = await post(open_server, json=body)
    assert status == 200 and normalise(text) == REFERENCE


@pytest.mark.parametrize(
    ("path", "status", "code", "words"),
    [
        ("/loop", 400, "url_fetch_failed", "more than 2 redirects"),
        ("/to-file", 400, "invalid_url", "only http and https"),
        ("/big", 413, "file_too_large", "limits.max_upload_bytes"),
        ("/missing", 400, "url_fetch_failed", "HTTP 404"),
    ],
)
async def test_url_fetch_failures(
    open_server: RunningServer, file_server: str, path: str, status: int, code: str, words: str
) -> None:
    got, error = await post_error(open_server, data=form(file_url=file_server + path))
    assert (got, error["code"]) == (status, code)
    assert words in error["message"]


# -- availability ---------------------------------------------------------------------------


async def test_server_still_serves_after_all_that(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/healthz") as resp:
            assert resp.status == 200
    status, _, text = await post(server, data=form(BECKETT.read_bytes(), response_format="text"))
    assert status == 200 and normalise(text) == REFERENCE


class _SlowLoadingEngine(Engine):
    """Warm-up blocks until released: the server stays in "loading"."""

    name = "slow"

    def __init__(self) -> None:
        self.release = threading.Event()

    def warmup(self) -> None:
        self.release.wait(30)

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        return [EngineResult("") for _ in batch]


async def test_503_while_the_engine_loads() -> None:
    engine = _SlowLoadingEngine()
    running = await start_server(make_config(), engine=engine, wait_ready=False)
    try:
        status, error = await post_error(running, data=form(BECKETT.read_bytes()))
        assert (status, error["code"]) == (503, "not_ready")
    finally:
        engine.release.set()
        await running.stop()


async def test_503_when_every_file_job_slot_is_taken() -> None:
    jobs = FileJobs(make_config(LIMITS__MAX_FILE_JOBS="1"))
    try:
        with jobs.slot():
            with pytest.raises(ApiError) as info:
                with jobs.slot():
                    pass
        assert info.value.status == 503 and info.value.code == "too_many_jobs"
        with jobs.slot():  # released again
            pass
    finally:
        jobs.executor.shutdown()
