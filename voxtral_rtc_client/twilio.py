"""A Twilio Media Stream as Twilio sends it: a client of the server's Twilio endpoint without
Twilio (tests and benchmarks; no account, no network).

Messages exactly as Twilio documents them (Media Streams - WebSocket Messages): ``connected``,
``start`` (``streamSid``, ``callSid``, ``accountSid``, ``tracks``, ``customParameters``,
``mediaFormat`` ``audio/x-mulaw`` 8000 Hz mono), ``media`` (``track``, ``chunk``,
``timestamp``, base64 ``payload`` of 20 ms), ``dtmf``, ``mark``, ``stop``; every number a
string, as Twilio sends them (``mediaFormat``'s are numbers, as in Twilio's examples). The
mu-law comes from PyAV's (FFmpeg's) ``pcm_mulaw`` encoder, so the server's decoding table is
checked against another implementation.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
import av
import numpy as np
import numpy.typing as npt

#: 20 ms of 8 kHz mu-law, as Twilio sends it.
CHUNK_BYTES = 160
CHUNK_MS = 20
MULAW_SILENCE = b"\xff"
MULAW_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}


def mulaw_8k(samples16k: npt.NDArray[np.float32]) -> bytes:
    """16 kHz float32 -> 8 kHz G.711 mu-law, through PyAV's resampler and encoder."""
    frame = av.AudioFrame.from_ndarray(samples16k.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = 16_000
    resampler = av.AudioResampler(format="s16", layout="mono", rate=8000)
    frames = [*resampler.resample(frame), *resampler.resample(None)]
    s16 = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype("<i2")
    ctx = av.CodecContext.create("pcm_mulaw", "w")
    ctx.sample_rate, ctx.format, ctx.layout = 8000, "s16", "mono"
    out = av.AudioFrame.from_ndarray(s16.reshape(1, -1), format="s16", layout="mono")
    out.sample_rate = 8000
    return b"".join(bytes(p) for p in [*ctx.encode(out), *ctx.encode(None)])


def silence(seconds: float) -> bytes:
    return MULAW_SILENCE * int(8000 * seconds)


def sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class TwilioStream:
    """One simulated stream on an open WebSocket."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        call_sid: str | None = None,
        tracks: tuple[str, ...] = ("inbound",),
        parameters: Mapping[str, str] | None = None,
    ) -> None:
        self.ws = ws
        self.call_sid = call_sid or sid("CA")
        self.stream_sid = sid("MZ")
        self.account_sid = sid("AC")
        self.tracks = tracks
        self.parameters = dict(parameters or {})
        self._sequence = 0
        self._chunks = dict.fromkeys(tracks, 0)

    def _next(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(message))

    async def connected(self) -> None:
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start_message(self, media_format: Mapping[str, Any] = MULAW_FORMAT) -> dict[str, Any]:
        return {
            "event": "start",
            "sequenceNumber": self._next(),
            "start": {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": list(self.tracks),
                "mediaFormat": dict(media_format),
                "customParameters": self.parameters,
            },
            "streamSid": self.stream_sid,
        }

    async def begin(self) -> None:
        """``connected`` then ``start``, as every stream opens."""
        await self.connected()
        await self.send(self.start_message())

    def media_message(self, track: str, timestamp_ms: int, payload: bytes) -> dict[str, Any]:
        self._chunks[track] = self._chunks.get(track, 0) + 1
        return {
            "event": "media",
            "sequenceNumber": self._next(),
            "media": {
                "track": track,
                "chunk": str(self._chunks[track]),
                "timestamp": str(timestamp_ms),
                "payload": base64.b64encode(payload).decode(),
            },
            "streamSid": self.stream_sid,
        }

    async def play(self, audio: Mapping[str, bytes], speed: float = 1.0, start_ms: int = 0) -> None:
        """Each track's mu-law in 20 ms ``media`` messages, the tracks interleaved as Twilio
        sends them, paced at ``speed`` times real time."""
        longest = max(len(a) for a in audio.values())
        began = time.monotonic()
        for i, offset in enumerate(range(0, longest, CHUNK_BYTES)):
            timestamp = start_ms + i * CHUNK_MS
            for track, data in audio.items():
                chunk = data[offset : offset + CHUNK_BYTES]
                if chunk:
                    await self.send(self.media_message(track, timestamp, chunk))
            due = began + (i + 1) * CHUNK_MS / 1000 / speed
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def dtmf(self, digit: str, track: str = "inbound_track") -> None:
        body = {"track": track, "digit": digit}
        await self.send(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": self._next(),
                "dtmf": body,
            }
        )

    async def mark(self, name: str) -> None:
        await self.send(
            {
                "event": "mark",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "mark": {"name": name},
            }
        )

    async def stop(self) -> None:
        await self.send(
            {
                "event": "stop",
                "sequenceNumber": self._next(),
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                "streamSid": self.stream_sid,
            }
        )
