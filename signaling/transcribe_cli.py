"""``voxtral-rtc transcribe PATH|URL|-``: transcribe one file in process, no server.

The same path as ``POST /v1/audio/transcriptions``: the configured engine behind an
``EngineWorker``, ``agent.audio_file`` to decode, ``agent.file_transcriber`` to cut and
transcribe, ``agent.transcript_formats`` to print. The input is read and decoded before the
engine loads, so a wrong path fails in a moment rather than after the model load.

A URL is fetched with the server's guards (schemes, redirects, timeout, size cap) except
the private-address one: the CLI already reads any local file its user can, so refusing
``http://localhost/...`` would protect nothing. Progress goes to stderr, the transcript to
stdout or ``--output``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from agent.audio_file import DecodedAudio, decode_audio
from agent.config import Config
from agent.engines.worker import EngineWorker
from agent.errors import AudioInputError, EngineError, EngineLoadError
from agent.file_transcriber import FileTranscriber, FileTranscript, Progress, TranscribeOptions
from agent.transcript_formats import RESPONSE_FORMATS, ResponseFormat, needs_timestamps, render
from agent.vad import create_vad
from signaling.url_fetch import FetchOptions, fetch_url

#: Files shorter than this finish too fast for a progress bar to help.
PROGRESS_MIN_S = 30.0
_LABELS = {"vad": "finding speech", "transcribe": "transcribing"}


def add_transcribe_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``transcribe`` subcommand."""
    cmd = sub.add_parser(
        "transcribe",
        help="transcribe an audio file, URL or stdin in process",
        description="Transcribe a file (any format PyAV decodes), an http(s) URL, or - "
        "for stdin, with the configured engine; no server needed.",
    )
    cmd.add_argument("source", help="audio file path, http(s) URL, or - for stdin")
    cmd.add_argument(
        "--format", "-f", choices=RESPONSE_FORMATS, default="text", help="output format"
    )
    cmd.add_argument("--language", "-l", help="ISO 639-1 language code, e.g. en")
    cmd.add_argument("--prompt", help="text that conditions the decoding (names, spelling)")
    cmd.add_argument("--output", "-o", help="write here instead of stdout")
    cmd.add_argument("--config", help="YAML configuration file (default: built-in defaults)")
    cmd.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def run_transcribe(args: argparse.Namespace, config: Config) -> int:
    """Run the subcommand; 0 on success, 1 on any failure (the message is on stderr)."""
    if config.logging.level != "DEBUG":
        # Start-up INFO lines would interleave with the progress bar; warnings still show.
        logging.getLogger().setLevel(logging.WARNING)
    try:
        transcript = asyncio.run(_transcribe(args, config))
    except (AudioInputError, EngineLoadError, EngineError, OSError) as exc:
        print(f"voxtral-rtc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    fmt: ResponseFormat = args.format
    body = render(transcript, fmt, config.engine.temperature).body
    if not body.endswith("\n"):
        body += "\n"
    if args.output:
        Path(args.output).write_text(body, encoding="utf-8")
    else:
        sys.stdout.write(body)
        sys.stdout.flush()
    return 0


async def _transcribe(args: argparse.Namespace, config: Config) -> FileTranscript:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="file-job")
    try:
        decoded = await _decode(args.source, config, executor)
        vad = await loop.run_in_executor(executor, create_vad, config.vad)
        worker = await EngineWorker.start(config.engine)
        try:
            transcriber = FileTranscriber.from_config(worker, vad, config, executor)
            options = TranscribeOptions(
                language=args.language or None,
                prompt=args.prompt or None,
                timestamps=needs_timestamps(args.format),
            )
            show = not args.quiet and decoded.duration_s >= PROGRESS_MIN_S
            progress = ProgressBar(sys.stderr) if show else None
            try:
                return await transcriber.transcribe(decoded.samples, options, progress)
            finally:
                if progress is not None:
                    progress.close()
        finally:
            await worker.close()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


async def _decode(source: str, config: Config, executor: ThreadPoolExecutor) -> DecodedAudio:
    loop = asyncio.get_running_loop()
    data: bytes | Path
    if source == "-":
        data = await loop.run_in_executor(executor, sys.stdin.buffer.read)
    elif source.startswith(("http://", "https://")):
        data = await fetch_url(source, FetchOptions.from_limits(config.limits, allow_private=True))
    else:
        data = Path(source)
        if not data.is_file():
            raise AudioInputError(f"no such file: {source}", "invalid_audio")
    return await loop.run_in_executor(executor, decode_audio, data, config.limits.max_audio_s)


class ProgressBar:
    """Plain-text progress on a stream: one redrawn line on a terminal, else a line per 10 %."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self._stream = stream
        self._width = width
        self._tty = stream.isatty()
        self._last: tuple[str, int] | None = None

    def __call__(self, progress: Progress) -> None:
        fraction = progress.done_s / progress.total_s if progress.total_s else 1.0
        percent = min(int(fraction * 100), 100)
        step = percent if self._tty else percent // 10 * 10
        if self._last == (progress.stage, step):
            return
        if self._tty and self._last is not None and self._last[0] != progress.stage:
            self._stream.write("\n")  # keep the finished stage's line
        self._last = (progress.stage, step)
        filled = round(self._width * fraction)
        line = (
            f"{_LABELS[progress.stage]:<14} [{'#' * filled}{'.' * (self._width - filled)}] "
            f"{percent:3d}%  {progress.done_s:.0f}/{progress.total_s:.0f} s"
        )
        self._stream.write(f"\r{line}" if self._tty else f"{line}\n")
        self._stream.flush()

    def close(self) -> None:
        if self._tty and self._last is not None:
            self._stream.write("\n")
            self._stream.flush()
