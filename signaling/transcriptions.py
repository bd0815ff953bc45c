"""``POST /v1/audio/transcriptions``: OpenAI / Mistral-compatible file transcription.

The request is read (``signaling.transcription_request``), the audio fetched if it is a URL
(``signaling.url_fetch``), decoded and resampled in a memory-limited child process
(``agent.decoder_process`` running ``agent.audio_file``), cut and transcribed through the
shared engine worker (``agent.file_transcriber``) and rendered
(``agent.transcript_formats``). With ``stream=true`` the texts go out as server-sent events
(``transcript.text.delta`` per piece, then ``transcript.text.done``) as soon as each piece
and all before it are done.

Every failure before the first byte of the answer is a JSON error: 400 for unusable input,
413 for the size and duration limits, 503 while the engine loads or when
``limits.max_file_jobs`` transcriptions already run. A failure while streaming is an SSE
``error`` event, which the ``openai`` SDK raises as ``APIError``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent.audio_file import DecodedAudio
from agent.config import Config
from agent.decoder_process import DecodeLimits, DecoderPool
from agent.errors import AudioInputError, EngineError
from agent.file_transcriber import FileTranscriber, Plan, Segment, TranscribeOptions, stitch
from agent.transcript_formats import needs_timestamps, render, usage
from signaling.errors import ApiError
from signaling.state import STATE, ServerState
from signaling.transcription_request import TranscriptionInput, read_transcription_request
from signaling.url_fetch import FetchOptions, fetch_url

log = logging.getLogger(__name__)

PATH = "/v1/audio/transcriptions"
#: Input error codes that are the size limits (413); every other one is a 400.
_TOO_LARGE = frozenset({"file_too_large", "audio_too_long"})
#: Uploads read at once per job slot: reads are paced (``limits.upload_min_bytes_per_s``),
#: so a few spare ones let clients queue their bytes while the jobs run.
READS_PER_JOB = 4


@dataclass(eq=False)
class FileJobs:
    """The route's own resources: read and job slot counts, the decoder processes, and the
    threads that run the VAD over decoded files.

    Its own executor, so the VAD over a long file never delays the live calls' VAD work on
    ``ServerState.executor``.
    """

    config: Config
    running: int = 0
    #: Request bodies being read. Bodies are read before a job slot is taken (a slow
    #: upload must not hold a slot), so this bounds the memory they hold instead.
    reading: int = 0
    executor: ThreadPoolExecutor = field(init=False)
    #: Uploads are decoded in separate, memory-limited processes (started lazily).
    decoder: DecoderPool = field(init=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(
            max_workers=self.config.limits.max_file_jobs, thread_name_prefix="file-job"
        )
        limits = self.config.limits
        self.decoder = DecoderPool(DecodeLimits(limits.max_audio_s, limits.decode_timeout_s))

    @property
    def max_reading(self) -> int:
        return READS_PER_JOB * self.config.limits.max_file_jobs

    @contextlib.contextmanager
    def read_slot(self) -> Iterator[None]:
        """Hold one of the ``max_reading`` body reads, or answer 503 at once."""
        if self.reading >= self.max_reading:
            raise _busy(f"the server reads its maximum of {self.max_reading} uploads at once")
        self.reading += 1
        try:
            yield
        finally:
            self.reading -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the ``limits.max_file_jobs`` slots, or answer 503 at once."""
        if self.running >= self.config.limits.max_file_jobs:
            raise _busy(
                f"the server runs its maximum of {self.config.limits.max_file_jobs} file "
                "transcriptions"
            )
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1


def _busy(why: str) -> ApiError:
    return ApiError(
        503, "too_many_jobs", f"{why}; retry shortly", "server_error", {"Retry-After": "5"}
    )


FILE_JOBS: web.AppKey[FileJobs] = web.AppKey("file_jobs", FileJobs)


def setup_transcription_routes(app: web.Application) -> None:
    """Add the endpoint and its resources to the signalling app."""
    app[FILE_JOBS] = FileJobs(app[STATE].config)
    app.router.add_post(PATH, transcriptions)
    app.on_cleanup.append(_close)


async def _close(app: web.Application) -> None:
    await app[FILE_JOBS].decoder.close()
    app[FILE_JOBS].executor.shutdown(wait=True, cancel_futures=True)


async def transcriptions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/transcriptions``: one file in, its transcript in the asked format."""
    state = _ready_state(request)
    jobs = request.app[FILE_JOBS]
    # The body first, then a slot: a client that stalls mid-upload holds a read (paced, so
    # not for long), never one of the few transcription slots.
    with jobs.read_slot():
        job = await read_transcription_request(request, state.config.limits)
    # A client that leaves cancels this handler (handler_cancellation): the decoder child
    # is killed and the pieces not yet decoded are withdrawn from the engine queue.
    with jobs.slot():
        try:
            return await _transcribe(request, state, jobs, job)
        except AudioInputError as exc:
            status = 413 if exc.code in _TOO_LARGE else 400
            raise ApiError(status, exc.code, str(exc)) from None
        except EngineError as exc:
            raise _engine_error(exc) from None


async def _transcribe(
    request: web.Request,
    state: ServerState,
    jobs: FileJobs,
    job: TranscriptionInput,
) -> web.StreamResponse:
    config = state.config
    assert state.worker is not None and state.vad is not None
    data = job.data
    if data is None:
        assert job.url is not None
        data = await fetch_url(job.url, FetchOptions.from_limits(config.limits))
    # Anyone's bytes: decoded in a process of its own (agent.decoder_process), never here.
    decoded: DecodedAudio = await jobs.decoder.decode(data)
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
