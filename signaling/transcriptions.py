"""``POST /v1/audio/transcriptions``: OpenAI / Mistral-compatible file transcription.

The request is read (``signaling.transcription_request``), the audio fetched if it is a URL
(``signaling.url_fetch``), decoded and resampled in a thread (``agent.audio_file``), cut and
transcribed through the shared engine worker (``agent.file_transcriber``) and rendered
(``agent.transcript_formats``). With ``stream=true`` the texts go out as server-sent events
(``transcript.text.delta`` per piece, then ``transcript.text.done``) as soon as each piece
and all before it are done.

Every failure before the first byte of the answer is a JSON error: 400 for unusable input,
413 for the size and duration limits, 503 while the engine loads or when
``limits.max_file_jobs`` transcriptions already run. A failure while streaming is an SSE
``error`` event, which the ``openai`` SDK raises as ``APIError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent.audio_file import DecodedAudio, decode_audio
from agent.config import Config
from agent.errors import AudioInputError, EngineError
from agent.file_transcriber import FileTranscriber, Plan, Segment, TranscribeOptions, stitch
from agent.transcript_formats import needs_timestamps, render, usage
from signaling.app import STATE, ServerState
from signaling.errors import ApiError
from signaling.transcription_request import TranscriptionInput, read_transcription_request
from signaling.url_fetch import FetchOptions, fetch_url

log = logging.getLogger(__name__)

PATH = "/v1/audio/transcriptions"
#: Input error codes that are the size limits (413); every other one is a 400.
_TOO_LARGE = frozenset({"file_too_large", "audio_too_long"})


@dataclass(eq=False)
class FileJobs:
    """The route's own resources: a slot count and the threads that decode and run the VAD.

    Its own executor, so decoding a long file never delays the live calls' VAD work on
    ``ServerState.executor``.
    """

    config: Config
    running: int = 0
    executor: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(
            max_workers=self.config.limits.max_file_jobs, thread_name_prefix="file-job"
        )

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the ``limits.max_file_jobs`` slots, or answer 503 at once."""
        if self.running >= self.config.limits.max_file_jobs:
            raise ApiError(
                503,
                "too_many_jobs",
                f"the server runs its maximum of {self.config.limits.max_file_jobs} file "
                "transcriptions; retry shortly",
                type_="server_error",
                headers={"Retry-After": "5"},
            )
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1


FILE_JOBS: web.AppKey[FileJobs] = web.AppKey("file_jobs", FileJobs)


def setup_transcription_routes(app: web.Application) -> None:
    """Add the endpoint and its resources to the signalling app."""
    app[FILE_JOBS] = FileJobs(app[STATE].config)
    app.router.add_post(PATH, transcriptions)
    app.on_cleanup.append(_close)


async def _close(app: web.Application) -> None:
    app[FILE_JOBS].executor.shutdown(wait=True, cancel_futures=True)


async def transcriptions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/transcriptions``: one file in, its transcript in the asked format."""
    state = _ready_state(request)
    jobs = request.app[FILE_JOBS]
    with jobs.slot():
        job = await read_transcription_request(request, state.config.limits)
        cancel = threading.Event()
        try:
            return await _transcribe(request, state, jobs, job, cancel)
        except AudioInputError as exc:
            status = 413 if exc.code in _TOO_LARGE else 400
            raise ApiError(status, exc.code, str(exc)) from None
        except EngineError as exc:
            raise _engine_error(exc) from None
        finally:
            cancel.set()  # a decode still running for a vanished client stops early


async def _transcribe(
    request: web.Request,
    state: ServerState,
    jobs: FileJobs,
    job: TranscriptionInput,
    cancel: threading.Event,
) -> web.StreamResponse:
    config = state.config
    assert state.worker is not None and state.vad is not None
    data = job.data
    if data is None:
        assert job.url is not None
        data = await fetch_url(job.url, FetchOptions.from_limits(config.limits))
    loop = asyncio.get_running_loop()
    decoded: DecodedAudio = await loop.run_in_executor(
        jobs.executor, lambda: decode_audio(data, config.limits.max_audio_s, cancel=cancel)
    )
    transcriber = FileTranscriber.from_config(state.worker, state.vad, config, jobs.executor)
    params = job.params
    options = TranscribeOptions(
        language=params.language,
        prompt=params.prompt,
        timestamps=needs_timestamps(params.response_format),
    )
    plan = await transcriber.plan(decoded.samples, options)
    if params.stream:
        segments = transcriber.segments(decoded.samples, plan, options)
        return await _stream(request, segments, plan, options)
    transcript = await transcriber.collect(decoded.samples, plan, options)
    rendered = render(transcript, params.response_format, config.engine.temperature)
    log.info(
        "transcribed %.1f s of audio in %d pieces (%s)",
        plan.duration_s,
        len(plan.pieces),
        params.response_format,
    )
    return web.Response(text=rendered.body, content_type=rendered.content_type)


async def _stream(
    request: web.Request,
    segments: AsyncGenerator[Segment, None],
    plan: Plan,
    options: TranscribeOptions,
) -> web.StreamResponse:
    """Server-sent events: a delta per piece in audio order, then the whole text."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    found: list[Segment] = []
    try:
        async with contextlib.aclosing(segments):
            async for segment in segments:
                delta = segment.text if not found else " " + segment.text
                found.append(segment)
                await _send(response, {"type": "transcript.text.delta", "delta": delta})
        transcript = stitch(found, plan.duration_s, options.language)
        done = {"type": "transcript.text.done", "text": transcript.text, "usage": usage(transcript)}
        await _send(response, done)
    except EngineError as exc:
        error = _engine_error(exc)
        body = {"type": error.type, "code": error.code, "message": error.message}
        await _send(response, {"type": "error", "error": body})
    except ConnectionResetError:
        log.info("transcription stream: the client went away")
        return response
    await response.write_eof()
    return response


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(event)}\n\n".encode())


def _ready_state(request: web.Request) -> ServerState:
    state = request.app[STATE]
    state.require_ready()  # the same 503s as /api/offer
    return state


def _engine_error(exc: EngineError) -> ApiError:
    if exc.code in ("queue_full", "engine_unavailable", "shutdown"):
        return ApiError(503, exc.code, str(exc), "server_error", {"Retry-After": "5"})
    return ApiError(500, exc.code, str(exc), "server_error")
