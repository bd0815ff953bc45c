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

A gateway's remote engine (``agent.engines.remote``) sends each live utterance here, a
canonical 16 kHz PCM WAV that is read in this process (``read_pcm16_wav``: no decoder child
for it). Its ``X-Voxtral-Priority: final|interim`` queues the pieces as live finals or
interims (a stale interim is skipped, 503 ``interim_skipped``), but only from callers the
server trusts (``server.priority_hints``): anyone else would jump the queue of the live
calls. Its answers (but streams) say in ``X-Voxtral-Capacity`` how many utterances the
engine runs at once, so gateways send no more than that and keep the queue on their side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent.audio_file import DecodedAudio, read_pcm16_wav
from agent.config import Config
from agent.decoder_process import DecodeLimits, DecoderPool
from agent.engines.remote import CAPACITY_HEADER, PRIORITY_HEADER, parse_priority_hint
from agent.engines.worker import EngineWorker, Priority
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

    def capacity(self, worker: EngineWorker | None) -> int:
        """Utterances the engine runs at once (lanes × batch), at most one per file job:
        what a gateway should send at once (``X-Voxtral-Capacity``)."""
        engine = worker.lanes * worker.max_batch if worker is not None else 1
        return max(1, min(engine, self.config.limits.max_file_jobs))

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
    try:
        response = await _serve(request, state, jobs)
    except ApiError as exc:
        exc.headers[CAPACITY_HEADER] = str(jobs.capacity(state.worker))
        raise
    if not response.prepared:  # a stream's headers are gone already (gateways never stream)
        response.headers[CAPACITY_HEADER] = str(jobs.capacity(state.worker))
    return response


async def _serve(request: web.Request, state: ServerState, jobs: FileJobs) -> web.StreamResponse:
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
    decoded = await _decode(data, jobs)
    transcriber = FileTranscriber.from_config(state.worker, state.vad, config, jobs.executor)
    params = job.params
    options = TranscribeOptions(
        language=params.language,
        prompt=params.prompt,
        timestamps=needs_timestamps(params.response_format),
        priority=_priority(request, config),
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


async def _decode(data: bytes, jobs: FileJobs) -> DecodedAudio:
    """A canonical 16 kHz PCM WAV (a gateway's utterance) is read here, on a file-job
    thread; anything else is anyone's bytes: decoded in a process of its own
    (``agent.decoder_process``), never here."""
    loop = asyncio.get_running_loop()
    max_s = jobs.config.limits.max_audio_s
    plain = await loop.run_in_executor(jobs.executor, read_pcm16_wav, data, max_s)
    return plain if plain is not None else await jobs.decoder.decode(data)


def _priority(request: web.Request, config: Config) -> Priority:
    """The engine queue of this request's pieces: a recorded file's, unless a trusted caller
    (a gateway) says it is a live final or interim.

    Trusted: with ``server.priority_hints: authenticated`` (the default) only when the
    server has ``auth_tokens``, since the auth middleware then let no one here without a
    token; with ``any``, every caller (a node that only gateways can reach). An untrusted
    hint is ignored, not refused: the file is still transcribed, in its place.
    """
    hint = parse_priority_hint(request.headers.get(PRIORITY_HEADER))
    policy = config.server.priority_hints
    trusted = policy == "any" or (policy == "authenticated" and bool(config.server.auth_tokens))
    return hint if hint is not None and trusted else Priority.FILE


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
    # interim_skipped: a gateway's interim that the engine had no time for (a newer one is
    # due), not a fault.
    if exc.code in ("queue_full", "engine_unavailable", "shutdown", "interim_skipped"):
        return ApiError(503, exc.code, str(exc), "server_error", {"Retry-After": "5"})
    return ApiError(500, exc.code, str(exc), "server_error")
