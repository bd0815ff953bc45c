"""Decode untrusted audio files in a separate, memory-limited process (``DecoderPool``).

Why a process and not a thread of the server:

* the event loop: PyAV holds the GIL through parts of demuxing and resampling, so a decode in
  a thread stalls ``/healthz`` and every live call (one 32 kB file stalled them for 6 s);
* memory: ``RLIMIT_AS`` bounds what one decode can allocate (``DecodeLimits.memory_bytes``),
  so a file crafted to make FFmpeg allocate gigabytes fails alone, as ``audio_too_complex``;
* files and sockets: ``RLIMIT_NOFILE`` leaves the child no descriptor to open, whatever FFmpeg
  might be tricked into (the format checks of ``agent.audio_file`` are the first guard);
* time: when the request goes away (its handler is cancelled) or the decode passes
  ``limits.decode_timeout_s``, its process is killed and reaped.

Each process decodes one file and exits, so nothing one hostile file did carries over to the
next. A fresh interpreter importing numpy and PyAV takes about 0.3 s on 2 cores, so the pool
keeps one process started ahead, idle on its stdin (about 50 MB resident). Processes are
started by fork + exec (an asyncio subprocess), never by a bare fork: the server has many
threads (aiortc, onnxruntime, the engine's).

The wire is the child's stdin and stdout: the parent writes one JSON line (the job) and the
file's bytes; the child answers one JSON line, the error (code and message) or what it
decoded, followed by the samples as raw native float32.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import resource
import signal
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from agent.audio_file import SAMPLE_RATE, DecodedAudio, check_header, decode_chunks
from agent.errors import AudioInputError, EngineError

Process = asyncio.subprocess.Process

#: Address space a decode may use beyond its decoded samples: FFmpeg's demuxer and decoder
#: buffers, the resampler's frames, numpy's temporaries (real files need a few tens of MB).
HEADROOM_BYTES = 256 << 20
#: Pipe transfers go in pieces of this size: the most the event loop copies in one step.
_PIPE_CHUNK = 1 << 20
#: One BLAS thread and two malloc arenas: the address space the limit counts is then the
#: decode's own, not idle per-thread reservations (64 MB of arena per thread by default).
_CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
#: The codes a child's answer may carry; anything else is reported as ``invalid_audio``.
_CODES = frozenset({"invalid_audio", "empty_audio", "audio_too_long", "audio_too_complex"})
#: Where ``agent`` is, for the children's ``PYTHONPATH`` (the server may run from anywhere).
_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class DecodeLimits:
    """What one decode may cost: audio length, wall-clock time and (derived) memory."""

    max_audio_s: float
    timeout_s: float
    rate: int = SAMPLE_RATE
    headroom_bytes: int = HEADROOM_BYTES

    @property
    def memory_bytes(self) -> int:
        """The decoded samples once (16 kHz float32 is 64 kB/s: 7200 s = 461 MB) + headroom.

        The child holds the samples once (it writes the resampler's pieces to the pipe one
        by one, never joined) and the file, which it reads before the limit is set.
        """
        return int(self.max_audio_s * self.rate * 4) + self.headroom_bytes

    @property
    def max_samples(self) -> int:
        """The most samples a child may send: the limit plus a second for the resampler's tail."""
        return int((self.max_audio_s + 1) * self.rate)


class DecoderPool:
    """Decoder processes: one per file, one started ahead; ``close`` stops them all."""

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self._spare: Process | None = None
        self._procs: set[Process] = set()
        self._closed = False

    async def decode(self, data: bytes) -> DecodedAudio:
        """Decode ``data`` in a process of its own; ``AudioInputError`` with its code if not."""
        # Not audio, or an impossible WAV header: refused here, at no process's cost.
        check_header(io.BytesIO(data))
        if self._closed:
            raise EngineError("the server is shutting down", "shutdown")
        proc, self._spare = self._spare, None
        try:
            if proc is None or proc.returncode is not None:
                proc = await self._start()
            await self._refill()
            async with asyncio.timeout(self.limits.timeout_s):
                return await self._exchange(proc, data)
        except AudioInputError:
            if self._closed:  # killed by ``close``, not by its file
                raise EngineError("the server is shutting down", "shutdown") from None
            raise
        except TimeoutError:
            raise AudioInputError(
                f"decoding the audio took longer than this server allows "
                f"({self.limits.timeout_s:.0f} s, limits.decode_timeout_s)",
                "audio_too_complex",
            ) from None
        finally:
            if proc is not None:
                await self._stop(proc)  # killed if still running (cancelled, timed out)

    async def close(self) -> None:
        """Kill every process (the spare, and any decode still running)."""
        self._closed = True
        self._spare = None
        for proc in list(self._procs):
            await self._stop(proc)

    async def _start(self) -> Process:
        path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.decoder_process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **_CHILD_ENV, "PYTHONPATH": path},
            # Its own session: a Ctrl-C meant for the server does not reach it; the server
            # kills it (and an idle one exits by itself when the server's end of stdin closes).
            start_new_session=True,
            limit=2 * _PIPE_CHUNK,
        )
        self._procs.add(proc)
        return proc

    async def _refill(self) -> None:
        """Start the next job's process now (fork + exec: milliseconds; it imports meanwhile)."""
        if self._spare is not None or self._closed:
            return
        spare = await self._start()
        if self._spare is None and not self._closed:
            self._spare = spare
        else:  # another job refilled while this one waited
            await self._stop(spare)

    async def _stop(self, proc: Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        try:
            await proc.wait()
        finally:
            self._procs.discard(proc)

    async def _exchange(self, proc: Process, data: bytes) -> DecodedAudio:
        assert proc.stdin is not None and proc.stdout is not None
        job = {
            "size": len(data),
            "max_audio_s": self.limits.max_audio_s,
            "rate": self.limits.rate,
            "memory_bytes": self.limits.memory_bytes,
        }
        try:
            proc.stdin.write(json.dumps(job).encode() + b"\n")
            view = memoryview(data)
            for start in range(0, len(view), _PIPE_CHUNK):
                proc.stdin.write(view[start : start + _PIPE_CHUNK])
                await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child is gone: its exit status, below, says why
        try:
            line = await proc.stdout.readline()
            answer = json.loads(line) if line.endswith(b"\n") else None
        except (ValueError, asyncio.LimitOverrunError):
            raise _bad_answer() from None
        if answer is None:
            raise _died(await proc.wait())
        return await self._read_samples(proc, answer)

    async def _read_samples(self, proc: Process, answer: Any) -> DecodedAudio:
        assert proc.stdout is not None
        if not isinstance(answer, dict):
            raise _bad_answer()
        if "error" in answer:
            error = answer["error"]
            code = error.get("code") if isinstance(error, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            raise AudioInputError(
                str(message or "the audio cannot be decoded"),
                code if code in _CODES else "invalid_audio",
            )
        try:
            count = int(answer["samples"])
            source = (int(answer["source_rate"]), int(answer["source_channels"]))
            codec = str(answer["codec"])
        except (KeyError, TypeError, ValueError):
            raise _bad_answer() from None
        # The child is where hostile bytes ran: its figures are checked, not trusted.
        if not 0 < count <= self.limits.max_samples:
            raise _bad_answer()
        samples = np.empty(count, dtype=np.float32)
        target = samples.data.cast("B")
        filled = 0
        while filled < len(target):
            piece = await proc.stdout.read(min(_PIPE_CHUNK, len(target) - filled))
            if not piece:
                raise _died(await proc.wait())
            target[filled : filled + len(piece)] = piece
            filled += len(piece)
        return DecodedAudio(samples, self.limits.rate, source[0], source[1], codec)


def _died(returncode: int) -> AudioInputError:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return AudioInputError(
            f"the audio decoder was stopped by {name} on this file: it needs more memory "
            "than this server allows, or is damaged",
            "audio_too_complex",
        )
    return AudioInputError(
        f"the audio decoder failed on this file (exit status {returncode})", "invalid_audio"
    )


def _bad_answer() -> AudioInputError:
    return AudioInputError("the audio decoder gave an invalid answer on this file", "invalid_audio")


# -- the child --------------------------------------------------------------------------------


def main() -> None:
    """The child: one job from stdin, its answer on stdout, then exit."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    # A tiny decode first: PyAV imports a few modules on its first open (reading files,
    # which the descriptor limit forbids later), and the job then finds FFmpeg initialised.
    decode_chunks(_silence_wav())
    line = stdin.readline()
    if not line:
        return  # the pool closed (or the server died) before this process had a job
    job = json.loads(line)
    data = stdin.read(int(job["size"]))
    _limit_resources(int(job["memory_bytes"]))
    try:
        decoded = decode_chunks(data, float(job["max_audio_s"]), int(job["rate"]))
    except AudioInputError as exc:
        _answer(stdout, {"error": {"code": exc.code, "message": str(exc)}})
        return
    del data
    info = {
        "samples": decoded.samples,
        "source_rate": decoded.source_rate,
        "source_channels": decoded.source_channels,
        "codec": decoded.codec,
    }
    _answer(stdout, info)
    for chunk in decoded.chunks:
        stdout.write(np.ascontiguousarray(chunk, dtype=np.float32).data)
    stdout.flush()


def _limit_resources(memory_bytes: int) -> None:
    """Bound this process before it touches the file: its memory, and no new descriptors."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        mapped = 0  # not Linux: RLIMIT_AS is not enforced there anyway
    if mapped:
        # Counted from what is already mapped (the interpreter, numpy, FFmpeg's libraries,
        # the file: about 300 MB, mostly never touched), so the budget is the decode's own.
        limit = mapped + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # stdin, stdout and stderr only: no file or socket can be opened from here on.
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, 3))


def _silence_wav(samples: int = 160) -> bytes:
    """10 ms of 16-bit mono silence at 16 kHz as a WAV file."""
    data = bytes(2 * samples)
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 16_000, 32_000, 2, 16)
    size = struct.pack("<I", 4 + len(fmt) + 8 + len(data))
    return b"RIFF" + size + b"WAVE" + fmt + b"data" + struct.pack("<I", len(data)) + data


def _answer(stdout: BinaryIO, answer: dict[str, Any]) -> None:
    stdout.write(json.dumps(answer).encode() + b"\n")
    stdout.flush()


if __name__ == "__main__":
    main()
