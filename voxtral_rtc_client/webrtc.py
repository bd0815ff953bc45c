"""A Python WebRTC client for the server: send audio, receive the transcription events.

Used by the integration tests and ``bench/latency.py``, and usable by any Python voice
agent: it speaks the same signalling (``POST /api/offer``) and data channel as the page.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import av
import numpy as np
import numpy.typing as npt
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

FRAME_MS = 20
COMPLETED = "conversation.item.input_audio_transcription.completed"

__all__ = [
    "COMPLETED",
    "FRAME_MS",
    "ArrayAudioTrack",
    "RealtimeClient",
    "ReceivedEvent",
    "utterances",
]


class ArrayAudioTrack(MediaStreamTrack):
    """Plays mono float32 samples in real time as 20 ms frames, then silence until stopped.

    ``started_at`` is the ``time.perf_counter()`` of the first frame, so a caller can tell
    when any sample left (sample ``i`` left at ``started_at + i / rate``).
    """

    kind = "audio"

    def __init__(
        self, samples: npt.NDArray[np.float32], rate: int = 16_000, then_silence: bool = True
    ) -> None:
        super().__init__()
        self._pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)
        self._rate = rate
        self._step = rate * FRAME_MS // 1000
        self._then_silence = then_silence
        self._pos = 0
        self.started_at: float | None = None

    @property
    def finished(self) -> bool:
        return self._pos >= len(self._pcm)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.started_at is None:
            self.started_at = time.perf_counter()
        else:
            due = self.started_at + self._pos / self._rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        chunk = self._pcm[self._pos : self._pos + self._step]
        if len(chunk) < self._step:
            if not self._then_silence and not len(chunk):
                self.stop()
                raise MediaStreamError
            chunk = np.concatenate([chunk, np.zeros(self._step - len(chunk), np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._pos
        frame.time_base = fractions.Fraction(1, self._rate)
        self._pos += self._step
        return frame


@dataclass(frozen=True)
class ReceivedEvent:
    event: dict[str, Any]
    #: ``time.perf_counter()`` at arrival.
    at: float

    @property
    def type(self) -> str:
        return str(self.event.get("type"))


class RealtimeClient:
    """One call to the server. ``async with RealtimeClient(url) as c: await c.connect(track)``."""

    def __init__(
        self,
        base_url: str,
        ice_servers: Sequence[RTCIceServer] = (),
        token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        #: Bearer token for servers with ``server.auth_tokens`` set.
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        # An explicit list, even empty: given None, aiortc would ask Google's STUN server.
        config = RTCConfiguration(iceServers=list(ice_servers))
        self.pc = RTCPeerConnection(configuration=config)
        self.channel: RTCDataChannel | None = None
        self.pc_id: str | None = None
        self.events: asyncio.Queue[ReceivedEvent] = asyncio.Queue()
        self.received: list[ReceivedEvent] = []
        self._opened = asyncio.Event()

    async def __aenter__(self) -> RealtimeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, track: MediaStreamTrack | None, label: str = "oai-events") -> None:
        if track is not None:
            self.pc.addTrack(track)
        else:
            # An audio section with nothing sent on it: a muted or broken microphone.
            self.pc.addTransceiver("audio", direction="sendonly")
        channel = self.pc.createDataChannel(label)
        self.channel = channel
        channel.on("open", self._opened.set)

        @channel.on("message")
        def _on_message(raw: str | bytes) -> None:
            received = ReceivedEvent(json.loads(raw), time.perf_counter())
            self.received.append(received)
            self.events.put_nowait(received)

        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription
        async with aiohttp.ClientSession(headers=self._headers) as http:
            async with http.post(
                f"{self.base_url}/api/offer", json={"sdp": offer.sdp, "type": offer.type}
            ) as resp:
                body = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"offer refused: {resp.status} {body}")
        self.pc_id = body["pc_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(body["sdp"], body["type"]))
        await asyncio.wait_for(self._opened.wait(), 20)

    def send(self, event: dict[str, Any]) -> None:
        self.send_raw(json.dumps(event))

    def send_raw(self, text: str) -> None:
        assert self.channel is not None
        self.channel.send(text)

    async def next_event(self, type_: str | None = None, timeout: float = 30.0) -> ReceivedEvent:
        """The next event (of ``type_`` if given; others are skipped but kept in ``received``)."""
        deadline = time.perf_counter() + timeout
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"no {type_ or 'event'} within {timeout} s")
            ev = await asyncio.wait_for(self.events.get(), remaining)
            if type_ is None or ev.type == type_:
                return ev

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [r.event for r in self.received if r.type == type_]

    def utterances(self) -> list[dict[str, Any]]:
        """The ``completed`` events that hold words, in arrival order (see ``utterances``)."""
        return utterances(self.received)

    async def close(self) -> None:
        await self.pc.close()


def utterances(received: Iterable[ReceivedEvent]) -> list[dict[str, Any]]:
    """What was said: the ``completed`` events with a transcript, in arrival order. A
    ``completed`` with an empty transcript closes an item the VAD opened on a breath or a
    click; the server must send it (the protocol closes every item), but it is no utterance."""
    return [
        r.event
        for r in received
        if r.type == COMPLETED and str(r.event.get("transcript") or "").strip()
    ]
