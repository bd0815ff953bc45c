"""Drive the server with Pipecat's OpenAI STT services inside a real Pipecat pipeline.

Run with .venvs/pipecat/bin/python. The pipeline is the smallest faithful one:

    [VADProcessor(SileroVADAnalyzer())] -> <STT service> -> Collector

fed ``InputAudioRawFrame``s (20 ms of the WAV at 16 kHz, paced by the clock, then silence)
through ``PipelineWorker.queue_frame``, as a transport would push them. Modes:

* ``realtime`` (default): ``OpenAIRealtimeSTTService(api_key, base_url=ws://.../v1/realtime)``
  with its default ``turn_detection=False``: it sends ``turn_detection: null`` and commits
  the buffer on each ``VADUserStoppedSpeakingFrame`` of the local Silero VAD. In a full
  Pipecat 1.14 app that frame comes from the user aggregator's ``vad_analyzer``
  (``LLMUserAggregatorParams``), which broadcasts it upstream to the STT; a ``VADProcessor``
  before the STT broadcasts the same frame.
* ``realtime-server-vad``: the same service with ``turn_detection={"type": "server_vad"}``
  and no local VAD in the pipeline (as Pipecat's docstring says for that mode).
* ``file``: ``OpenAISTTService(api_key, base_url=http://.../v1)`` (a SegmentedSTTService:
  the local VAD cuts segments, each posted as a WAV to ``/v1/audio/transcriptions``).

Prints one JSON line per ``TranscriptionFrame`` (``{"frame": "TranscriptionFrame", "text"}``),
``InterimTranscriptionFrame``, ``ErrorFrame`` and VAD/turn frame that reaches the end of the
pipeline; exits after ``--expect`` TranscriptionFrames or on ``--timeout``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from _common import base_arguments, emit, read_wav, resample
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    ProposedUserStartedSpeakingFrame,
    ProposedUserStoppedSpeakingFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.stt import OpenAIRealtimeSTTService, OpenAISTTService
from pipecat.workers.runner import WorkerRunner

RATE = 16000
SHOWN = (
    ErrorFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
    ProposedUserStartedSpeakingFrame,
    ProposedUserStoppedSpeakingFrame,
)


class Collector(FrameProcessor):
    """The pipeline's last processor: reports what the STT produced, counts finals."""

    def __init__(self, expect: int) -> None:
        super().__init__()
        self.expect = expect
        self.finals = 0
        self.done = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            self.finals += 1
            emit({"frame": "TranscriptionFrame", "text": frame.text, "result": _result(frame)})
            if self.finals >= self.expect:
                self.done.set()
        elif isinstance(frame, InterimTranscriptionFrame):
            emit({"frame": "InterimTranscriptionFrame", "text": frame.text})
        elif isinstance(frame, SHOWN):
            record: dict[str, Any] = {"frame": type(frame).__name__}
            if isinstance(frame, ErrorFrame):
                record["error"] = frame.error
                record["fatal"] = frame.fatal
            emit(record)
        await self.push_frame(frame, direction)


def _result(frame: TranscriptionFrame) -> Any:
    result = getattr(frame, "result", None)
    return result if isinstance(result, dict) else None


def make_stt(args: Any) -> FrameProcessor:
    base = args.base_url.rstrip("/")
    if args.mode == "file":
        settings = OpenAISTTService.Settings(model=args.model) if args.model else None
        return OpenAISTTService(api_key=args.token, base_url=f"{base}/v1", settings=settings)
    ws = "ws" + base[len("http") :] if base.startswith("http") else base
    settings = OpenAIRealtimeSTTService.Settings(model=args.model) if args.model else None
    turn_detection: dict[str, Any] | bool = (
        {"type": "server_vad"} if args.mode == "realtime-server-vad" else False
    )
    return OpenAIRealtimeSTTService(
        api_key=args.token,
        base_url=f"{ws}/v1/realtime",
        turn_detection=turn_detection,  # type: ignore[arg-type]
        settings=settings,
    )


async def main() -> int:
    parser = base_arguments(__doc__ or "")
    parser.add_argument("--base-url", required=True, help="http://127.0.0.1:PORT (no /v1)")
    parser.add_argument(
        "--mode", choices=["realtime", "realtime-server-vad", "file"], default="realtime"
    )
    parser.add_argument("--model", default="", help="default: the service's own")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level=args.log_level)

    samples, rate = read_wav(args.wav)
    pcm = resample(samples, rate, RATE).tobytes() + bytes(2 * int(RATE * args.tail_s))

    collector = Collector(args.expect)
    processors: list[FrameProcessor] = []
    if args.mode != "realtime-server-vad":
        processors.append(VADProcessor(vad_analyzer=SileroVADAnalyzer()))
    processors += [make_stt(args), collector]
    worker = PipelineWorker(
        Pipeline(processors),
        params=PipelineParams(audio_in_sample_rate=RATE),
        enable_rtvi=False,
        idle_timeout_secs=None,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(*_: Any) -> None:
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())

    async def feed() -> None:
        await started.wait()
        emit({"driver": "pipeline_started"})
        step = 2 * RATE * args.chunk_ms // 1000
        start = time.monotonic()
        for k, at in enumerate(range(0, len(pcm), step)):
            delay = start + k * args.chunk_ms / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = pcm[at : at + step].ljust(step, b"\0")
            await worker.queue_frame(
                InputAudioRawFrame(audio=chunk, sample_rate=RATE, num_channels=1)
            )
        emit({"driver": "audio_done"})

    feeder = asyncio.create_task(feed())
    code = 0
    try:
        async with asyncio.timeout(args.timeout):
            waiter = asyncio.create_task(collector.done.wait())
            finished, _ = await asyncio.wait({waiter, running}, return_when=asyncio.FIRST_COMPLETED)
            if waiter not in finished:
                waiter.cancel()
                emit({"driver": "pipeline_ended", "finals": collector.finals})
                code = 4
    except TimeoutError:
        emit({"driver": "timeout", "finals": collector.finals})
        code = 3
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        if not running.done():
            await worker.queue_frame(EndFrame())
            try:
                await asyncio.wait_for(asyncio.shield(running), 10)
            except TimeoutError:
                await worker.cancel()
                await asyncio.gather(running, return_exceptions=True)
    if code == 0:
        emit({"driver": "done", "finals": collector.finals})
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
