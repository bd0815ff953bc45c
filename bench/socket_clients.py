"""The benchmark's WebSocket clients: ``/v1/realtime`` sessions and Twilio phone streams.

Both are shaped like ``voxtral_rtc_client.RealtimeClient`` for ``bench/latency.py``
(``connect``, ``received``, ``next_event``, ``close``) and are their own send clock
(``started_at``: when the first chunk of audio left; ``max_lateness_ms``). Both send the
file's chunks paced by the clock (chunk ``k`` when ``started_at + k x chunk`` is due), then
chunks of silence until closed, as a live microphone or a phone line would; a reader task
stamps every event on arrival.

- ``WsClient``: ``/v1/realtime?intent=transcription``, session defaults (pcm16 24 kHz,
  server VAD), ``input_audio_buffer.append`` of ``chunk_ms``; events on the same socket.
- ``TwilioClient``: ``/v1/twilio/media-stream`` spoken to exactly as Twilio speaks
  (``voxtral_rtc_client/twilio.py``'s ``TwilioStream`` builds every message: ``connected``,
  ``start`` with one ``inbound`` track, 20 ms ``media`` of 8 kHz mu-law from PyAV, ``stop``),
  and the call's events read by a subscriber on ``/v1/calls/{callSid}/events``: the clock
  that matters is the subscriber's, where a voice agent would read the transcripts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from typing import Any

import aiohttp
import numpy as np
import soxr

from voxtral_rtc_client import ReceivedEvent
from voxtral_rtc_client.twilio import CHUNK_BYTES, CHUNK_MS, MULAW_SILENCE, TwilioStream, mulaw_8k

CONNECT_TIMEOUT_S = 30.0
#: ``/v1/realtime``'s default input format: pcm16 mono at 24 kHz.
WS_RATE = 24_000
MEDIA_PATH = "/v1/twilio/media-stream"
#: The one track of a ``<Connect><Stream>`` (or ``track="inbound_track"``): the caller.
TWILIO_TRACK = "inbound"


class WsAudio:
    """The file as ``/v1/realtime`` appends, built once per phase and shared by its streams:
    pcm16 at 24 kHz (soxr, as Pipecat resamples), ``chunk_ms`` per ``input_audio_buffer.append``,
    each message already JSON (base64), and one of silence for after the file."""

    def __init__(self, samples: Any, chunk_ms: int) -> None:
        pcm = to_pcm16(samples, WS_RATE)
        step = WS_RATE * chunk_ms // 1000
        self.chunk_s = step / WS_RATE
        self.messages = [_append(pcm[i : i + step]) for i in range(0, len(pcm), step)]
        self.silence = _append(np.zeros(step, "<i2"))


class TwilioAudio:
    """The file as a phone line carries it, built once per phase: 8 kHz G.711 mu-law from
    PyAV (the simulator's ``mulaw_8k``), cut into Twilio's 20 ms payloads of 160 bytes (the
    last one padded with mu-law silence)."""

    chunk_s = CHUNK_MS / 1000

    def __init__(self, samples: Any) -> None:
        law = mulaw_8k(np.asarray(samples, np.float32))
        law += MULAW_SILENCE * (-len(law) % CHUNK_BYTES)
        self.payloads = [law[i : i + CHUNK_BYTES] for i in range(0, len(law), CHUNK_BYTES)]
        self.silence = MULAW_SILENCE * CHUNK_BYTES


def to_pcm16(samples: Any, rate: int) -> Any:
    # Up-sampled as Pipecat's OpenAI transcription service does before it sends (soxr, very
    # high quality; LiveKit's resampler is soxr too). PyAV's default filter, which this client
    # used before, dulls the top of the band: offline, each pass through it cost tiny.en 6-8
    # of read8's 1203 words (docs/benchmarks.md, "Live word error rate").
    up = soxr.resample(np.asarray(samples, np.float32), 16_000, rate, quality="VHQ")
    return (np.clip(up, -1.0, 1.0) * 32767).astype("<i2")


def _append(pcm: Any) -> str:
    audio = base64.b64encode(pcm.tobytes()).decode()
    return json.dumps({"type": "input_audio_buffer.append", "audio": audio})


def _ws_url(base_url: str, path: str) -> str:
    return base_url.rstrip("/").replace("http://", "ws://", 1) + path


class PacedSocketClient:
    """What both socket clients share: the events of one socket stamped on arrival, and a
    sender that paces chunks by the clock. Subclasses open the sockets (``connect``) and say
    what chunk ``k`` is (``_message``) and how long a chunk lasts (``chunk_s``)."""

    chunk_s: float

    def __init__(self) -> None:
        self.received: list[ReceivedEvent] = []
        self.events: asyncio.Queue[ReceivedEvent] = asyncio.Queue()
        self.started_at: float | None = None
        self.max_lateness_ms = 0.0
        self.session: dict[str, Any] | None = None
        self.send_error: str | None = None
        #: The close code when the server closed the events socket before the client did.
        self.server_closed: int | None = None
        self._closing = False
        self._http: aiohttp.ClientSession | None = None
        self._events_ws: aiohttp.ClientWebSocketResponse | None = None
        self._audio_ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None

    def _message(self, k: int) -> str:
        raise NotImplementedError

    async def _read(self) -> None:
        ws = self._events_ws
        assert ws is not None
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                received = ReceivedEvent(json.loads(msg.data), time.perf_counter())
                self.received.append(received)
                self.events.put_nowait(received)
        if not self._closing:
            self.server_closed = ws.close_code or -1

    async def _listen(self) -> None:
        """Read the events socket; wait for ``session.created``; then start sending."""
        self._reader = asyncio.create_task(self._read())
        created = await self.next_event("session.created", timeout=CONNECT_TIMEOUT_S)
        self.session = created.event.get("session")
        self._sender = asyncio.create_task(self._send())

    async def _send(self) -> None:
        ws = self._audio_ws
        assert ws is not None
        k = 0
        try:
            while not ws.closed:
                now = time.perf_counter()
                if self.started_at is None:
                    self.started_at = now
                else:
                    due = self.started_at + k * self.chunk_s
                    if due > now:
                        await asyncio.sleep(due - now)
                    late = (time.perf_counter() - due) * 1000
                    self.max_lateness_ms = max(self.max_lateness_ms, late)
                await ws.send_str(self._message(k))
                k += 1
        except (ConnectionError, RuntimeError) as exc:  # the server closed the socket
            self.send_error = f"{type(exc).__name__}: {exc}"

    async def next_event(self, type_: str | None = None, timeout: float = 30.0) -> ReceivedEvent:
        """The next event (of ``type_`` if given; others are skipped but kept in ``received``)."""
        deadline = time.perf_counter() + timeout
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"no {type_ or 'event'} within {timeout} s")
            if self.server_closed is not None and self.events.empty():
                raise RuntimeError(f"the server closed the socket (code {self.server_closed})")
            try:  # in slices: a socket the server closes ends the wait early
                ev = await asyncio.wait_for(self.events.get(), min(remaining, 0.5))
            except TimeoutError:
                continue
            if type_ is None or ev.type == type_:
                return ev

    async def _stop_sending(self) -> None:
        self._closing = True
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender

    async def _release(self) -> None:
        for ws in (self._audio_ws, self._events_ws):
            if ws is not None and not ws.closed:
                await ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._http is not None:
            await self._http.close()


class WsClient(PacedSocketClient):
    """One ``/v1/realtime?intent=transcription`` session on a raw aiohttp WebSocket: the
    file's appends after ``session.created``, then appends of silence until closed."""

    def __init__(self, base_url: str, audio: WsAudio) -> None:
        super().__init__()
        self.url = _ws_url(base_url, "/v1/realtime?intent=transcription")
        self._audio = audio
        self.chunk_s = audio.chunk_s

    def _message(self, k: int) -> str:
        audio = self._audio
        return audio.messages[k] if k < len(audio.messages) else audio.silence

    async def connect(self) -> None:
        self._http = aiohttp.ClientSession()
        self._events_ws = self._audio_ws = await self._http.ws_connect(self.url, autoping=True)
        await self._listen()

    async def close(self) -> None:
        """Stop sending, close the socket (the server flushes the open utterance), release."""
        await self._stop_sending()
        await self._release()


class TwilioClient(PacedSocketClient):
    """One phone call's Media Stream as Twilio sends it, and one subscriber to its events.

    ``connect``: the media-stream socket, ``connected`` + ``start`` (a fresh ``CA…`` call
    SID, one ``inbound`` track, mu-law 8 kHz), then the subscriber socket on
    ``/v1/calls/{callSid}/events`` (retried while the server answers 404: the call's hub
    exists once it has handled ``start``), and, after the replayed ``session.created``, the
    ``media`` messages: 160 bytes each, ``timestamp`` = 20 ms x chunk, paced by the clock,
    silence after the file. ``close``: ``stop``; the server flushes, closes the stream, and
    closes the subscriber (1000) once the call's last stream has ended; ``stream_closed`` /
    ``subscriber_closed`` record the close codes, ``close_ms`` how long after ``stop``."""

    def __init__(self, base_url: str, audio: TwilioAudio) -> None:
        super().__init__()
        self.base_url = base_url
        self._audio = audio
        self.chunk_s = audio.chunk_s
        self.stream: TwilioStream | None = None
        self.call_sid: str | None = None
        self.subscribe_attempts = 0
        self.stream_closed: int | None = None
        self.subscriber_closed: int | None = None
        self.close_ms: float | None = None
        #: Messages the server sent on the media stream (it must send none).
        self.sent_to_twilio = 0
        self._media_reader: asyncio.Task[None] | None = None

    def _message(self, k: int) -> str:
        assert self.stream is not None
        audio = self._audio
        payload = audio.payloads[k] if k < len(audio.payloads) else audio.silence
        return json.dumps(self.stream.media_message(TWILIO_TRACK, k * CHUNK_MS, payload))

    async def connect(self) -> None:
        self._http = aiohttp.ClientSession()
        self._audio_ws = await self._http.ws_connect(_ws_url(self.base_url, MEDIA_PATH))
        self.stream = TwilioStream(self._audio_ws, tracks=(TWILIO_TRACK,))
        self.call_sid = self.stream.call_sid
        self._media_reader = asyncio.create_task(self._drain_media())
        await self.stream.begin()
        events = _ws_url(self.base_url, f"/v1/calls/{self.call_sid}/events")
        deadline = time.perf_counter() + CONNECT_TIMEOUT_S
        while True:
            self.subscribe_attempts += 1
            try:
                self._events_ws = await self._http.ws_connect(events, autoping=True)
                break
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status != 404 or time.perf_counter() > deadline:
                    raise
                await asyncio.sleep(0.02)  # start not handled yet: no hub for the call
        await self._listen()

    async def _drain_media(self) -> None:
        """Read the media socket as Twilio does: it answers the server's pings, and sees the
        close. The server must never send Twilio a message (it would be played to the
        caller on a ``<Connect><Stream>``): any it sends is counted."""
        ws = self._audio_ws
        assert ws is not None
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.sent_to_twilio += 1
        self.stream_closed = ws.close_code

    async def close(self) -> None:
        """Stop the media, send ``stop``, wait for the server to close both sockets."""
        await self._stop_sending()
        t0 = time.perf_counter()
        ws = self._audio_ws
        if ws is not None and self.stream is not None and not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.stream.stop()
        for task in (self._media_reader, self._reader):
            if task is not None:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(task), CONNECT_TIMEOUT_S)
        if self._events_ws is not None and self._events_ws.closed:
            self.subscriber_closed = self._events_ws.close_code
        self.close_ms = round((time.perf_counter() - t0) * 1000, 1)
        await self._release()
        if self._media_reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._media_reader
