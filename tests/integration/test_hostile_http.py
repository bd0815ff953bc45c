"""HTTP-level abuse of the real server (127.0.0.1 only): stalled and aborted uploads, clients
that leave mid-job, idle connections, and what the answers reveal about the server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest

import signaling.app
from agent.engines.base import Engine
from agent.file_transcriber import FileTranscriber, TranscribeOptions
from signaling.app import RunningServer, start_server
from signaling.transcriptions import FILE_JOBS
from tests.conftest import BECKETT, make_config, normalise
from tests.support.audio_files import wav_bytes
from tests.support.engine_gate import CountingEngine

PATH = "/v1/audio/transcriptions"


@contextlib.asynccontextmanager
async def running(engine: Engine, **env: str) -> AsyncIterator[RunningServer]:
    server = await start_server(make_config(**env), engine=engine)
    try:
        yield server
    finally:
        await server.stop()


async def _stalled_upload(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A multipart upload that announces 1 MB, sends its first bytes and then nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    boundary = "x1x2x3"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    writer.write(
        (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            "Content-Length: 1000000\r\n\r\n"
        ).encode()
        + head
        + b"RIFF"
    )
    await writer.drain()
    return reader, writer


async def test_stalled_uploads_hold_no_job_slot(embedded_engine: Engine) -> None:
    """Two uploads that stall mid-body do not stop a third client's transcription (both
    job slots stay free while they stall), and each stalled one gets 408 once its pace
    falls under the minimum."""
    async with running(
        embedded_engine,
        LIMITS__MAX_FILE_JOBS="2",
        LIMITS__UPLOAD_GRACE_S="3",
        LIMITS__UPLOAD_MIN_BYTES_PER_S="1024",
    ) as server:
        stalled = [await _stalled_upload(server.port) for _ in range(2)]
        jobs = server.app[FILE_JOBS]
        for _ in range(100):  # both reads are under way
            if jobs.reading == 2:
                break
            await asyncio.sleep(0.02)
        assert jobs.reading == 2 and jobs.running == 0
        async with aiohttp.ClientSession() as http:
            body = aiohttp.FormData()
            body.add_field("file", BECKETT.read_bytes(), filename="beckett.wav")
            body.add_field("response_format", "text")
            async with http.post(server.url + PATH, data=body) as resp:
                text = await resp.text()
                assert resp.status == 200, text
        assert "fail better" in normalise(text)
        for reader, writer in stalled:
            answer = await asyncio.wait_for(reader.read(4096), 30)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"upload_timeout" in answer
            writer.close()
        assert jobs.reading == 0 and jobs.running == 0


async def test_a_client_that_leaves_cancels_its_job(
    embedded_engine: Engine, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """A client that disconnects mid-transcription stops its job: the slot is freed and the
    pieces still queued never reach the engine."""
    engine = CountingEngine(embedded_engine)
    audio = np.tile(beckett_audio, 8)  # 48 phrases, one piece each with timestamps
    async with running(engine) as server:
        state = server.state
        assert state.worker is not None and state.vad is not None
        transcriber = FileTranscriber.from_config(
            state.worker, state.vad, state.config, state.executor
        )
        plan = await transcriber.plan(audio, TranscribeOptions(timestamps=True))
        assert len(plan.pieces) >= 24
        warm = engine.count
        jobs = server.app[FILE_JOBS]

        async def client() -> None:
            async with aiohttp.ClientSession() as http:
                body = aiohttp.FormData()
                body.add_field("file", wav_bytes(audio), filename="long.wav")
                body.add_field("response_format", "verbose_json")
                async with http.post(server.url + PATH, data=body) as resp:
                    await resp.read()

        task = asyncio.create_task(client())
        for _ in range(3000):  # the job is transcribing: its first piece went to the engine
            if engine.count > warm:
                break
            await asyncio.sleep(0.01)
        assert engine.count > warm and jobs.running == 1
        task.cancel()  # the client goes away: its connection closes
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(1000):
            if jobs.running == 0:
                break
            await asyncio.sleep(0.01)
        assert jobs.running == 0, "the job kept its slot after its client left"
        done = engine.count - warm
        await asyncio.sleep(1.0)  # nothing more reaches the engine for that job
        assert engine.count - warm == done
        assert done < len(plan.pieces), (done, len(plan.pieces))
        metrics = server.state.metrics.render().decode()
        assert "internal_error" not in metrics


async def test_an_aborted_upload_is_a_client_event(embedded_engine: Engine) -> None:
    """A client that hangs up mid-body is counted as the client's doing, never as an
    internal error of the server."""
    async with running(embedded_engine) as server:
        jobs = server.app[FILE_JOBS]
        _reader, writer = await _stalled_upload(server.port)
        writer.write(b"\0" * 1000)
        await writer.drain()
        for _ in range(500):  # the server is reading the body
            if jobs.reading == 1:
                break
            await asyncio.sleep(0.01)
        assert jobs.reading == 1
        writer.close()
        await writer.wait_closed()
        for _ in range(500):
            if jobs.reading == 0 and server.state.inflight == 0:
                break
            await asyncio.sleep(0.01)
        assert jobs.reading == 0 and server.state.inflight == 0
        metrics = server.state.metrics.render().decode()
        assert "internal_error" not in metrics
        assert 'code="client_closed_request"' in metrics or 'code="upload_aborted"' in metrics


async def test_idle_and_half_sent_connections_are_closed(
    embedded_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that never completes its request headers is closed by the server."""
    monkeypatch.setattr(signaling.app, "IDLE_CONNECTION_S", 1.0)
    async with running(embedded_engine) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        await writer.drain()
        # aiohttp's own default would keep it for an hour.
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(idle_reader.read(), 10) == b""
        idle_writer.close()


async def test_answers_do_not_name_the_server_software(embedded_engine: Engine) -> None:
    async with running(embedded_engine) as server, aiohttp.ClientSession() as http:
        for path in ("/healthz", "/api/nothing-here", "/v1/audio/transcriptions"):
            async with http.get(server.url + path) as resp:
                server_header = resp.headers.get("Server", "")
                assert server_header == "voxtral-rtc", (path, server_header)
                assert "aiohttp" not in server_header and "Python" not in server_header
