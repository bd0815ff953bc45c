"""The remote engine: utterances go to OpenAI-compatible transcription servers over HTTP.

A gateway that terminates calls on cheap CPU boxes sends each utterance (finals, and
interims when they are on) to ``POST {base_url}/audio/transcriptions`` of vLLM serving
Voxtral, or of another voxtral-rtc, as a multipart 16 kHz mono 16-bit WAV with
``response_format=json``, and reads ``text``. (vLLM's ``stream=true`` answer is its own
``transcription.chunk`` SSE, not OpenAI's, and a whole utterance is short: ``json`` it is.)

It only waits, so it runs on the event loop (``AsyncEngine``): one pooled aiohttp session,
no thread per request, and a request whose utterance is withdrawn is really aborted (its
connection is closed, the server's handler sees its client leave).

Faults: a connection error or a 5xx is retried, backing off, on the least busy other
server when there is one, within the utterance's ``timeout_s`` (then ``engine_timeout``). A
server that fails ``backend_pool.FAILURE_THRESHOLD`` times in a row (timeouts included) is
taken out of service and probed in the background until it answers again; while every
server is out, utterances fail at once with ``engine_unavailable`` and the engine is
``degraded`` (``/readyz``, ``voxtral_rtc_engine_degraded``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import wave
from dataclasses import dataclass

import aiohttp
import numpy as np

from agent import json_guard
from agent.config import EngineConfig
from agent.engines.backend_pool import Backend, BackendPool
from agent.engines.base import SAMPLE_RATE, AsyncEngine, EngineRequest, EngineResult, Samples
from agent.errors import EngineError

log = logging.getLogger(__name__)

#: Idle pooled connections are closed after this long: shorter than the servers' own
#: keep-alive (uvicorn, under vLLM, closes at 5 s; voxtral-rtc at 15 s), so a request never
#: goes out on a connection the server is closing at that moment.
KEEPALIVE_S = 4.0
#: A probe is half a second of silence: any server answers it quickly.
PROBE_AUDIO_S = 0.5
PROBE_TIMEOUT_S = 5.0
#: Probes of a server out of service start this often and back off to the maximum.
PROBE_FIRST_S = 0.25
PROBE_MAX_S = 2.0
#: Waits before the 2nd, 3rd... try of a request (then capped): short, since a person is
#: waiting for the text, and bounded by the utterance's ``timeout_s`` anyway.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
#: A transcription answer is a few hundred bytes; anything past this is not one.
MAX_ANSWER_BYTES = 1 << 20
#: Answers that say "busy, try again" rather than "broken": retried, but they never take a
#: server out of service (a voxtral-rtc node at its ``limits.max_file_jobs`` says 503).
_BUSY = frozenset({429, 503})


def encode_wav(samples: Samples) -> bytes:
    """16 kHz mono float32 in [-1, 1] -> a 16-bit PCM WAV file (about 1 ms per 10 s)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(pcm.tobytes())
    return out.getvalue()


def backoff_s(retry: int) -> float:
    """Wait before retry number ``retry`` (0-based): 0.1, 0.2, 0.4 ... 2 s."""
    return float(min(BACKOFF_FIRST_S * 2**retry, BACKOFF_MAX_S))


class _Failed(Exception):
    """One try failed in a way worth retrying; ``code`` is the item's code if it was the last."""

    def __init__(self, message: str, code: str, counts: bool) -> None:
        super().__init__(message)
        self.code = code
        #: Whether it counts against the server's circuit (busy answers do not).
        self.counts = counts


@dataclass(eq=False)
class _Try:
    """The server a request is waiting on right now, for the timeout to blame."""

    backend: Backend | None = None


class RemoteEngine(AsyncEngine):
    def __init__(self, config: EngineConfig) -> None:
        remote = config.remote
        self._remote = remote
        self._language = config.language or None
        self.name = f"remote:{remote.model}" if remote.model else "remote"
        self.max_concurrency = remote.max_concurrency
        self.pool = BackendPool(remote.base_url)
        self._http: aiohttp.ClientSession | None = None
        self._probes: dict[Backend, asyncio.Task[None]] = {}
        self._silence = encode_wav(np.zeros(int(SAMPLE_RATE * PROBE_AUDIO_S), np.float32))

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pool and probe every server once. One that does not answer starts out of
        service (the gateway still starts, degraded if none answers): the inference fleet
        may come up after the gateways."""
        connector = aiohttp.TCPConnector(
            limit=self.max_concurrency + len(self.pool.backends),  # + one probe per server
            keepalive_timeout=KEEPALIVE_S,
        )
        headers = (
            {"Authorization": f"Bearer {self._remote.api_key}"} if self._remote.api_key else {}
        )
        # trust_env=False: requests go to the configured servers, never to an environment proxy.
        self._http = aiohttp.ClientSession(connector=connector, headers=headers, trust_env=False)
        answers = await asyncio.gather(*(self._probe(b) for b in self.pool.backends))
        for backend, up in zip(self.pool.backends, answers, strict=True):
            if up:
                log.info("transcription server %s answers", backend.url)
            else:
                self.pool.take_out(backend)
                log.warning("transcription server %s does not answer: out of service", backend.url)
                self._watch(backend)

    async def aclose(self) -> None:
        probes = list(self._probes.values())
        for task in probes:
            task.cancel()
        for task in probes:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._probes.clear()
        if self._http is not None:
            await self._http.close()

    @property
    def degraded(self) -> bool:
        return self.pool.all_open

    # -- one utterance ---------------------------------------------------------------------

    async def transcribe_one(self, request: EngineRequest) -> EngineResult:
        wav = encode_wav(request.audio)
        language = request.language or self._language
        current = _Try()
        try:
            async with asyncio.timeout(self._remote.timeout_s):
                text = await self._tries(wav, language, request.prompt, current)
        except TimeoutError:
            if current.backend is not None:
                self._failed(current.backend)  # a server that never answers is not in service
            raise EngineError(
                f"no transcription within engine.remote.timeout_s ({self._remote.timeout_s:g} s)",
                "engine_timeout",
            ) from None
        return EngineResult(text, language)

    async def _tries(
        self, wav: bytes, language: str | None, prompt: str | None, current: _Try
    ) -> str:
        tried: list[Backend] = []
        last: _Failed | None = None
        for attempt in range(self._remote.retries + 1):
            if attempt:
                await asyncio.sleep(backoff_s(attempt - 1))
            backend = self.pool.choose(avoid=tried)
            if backend is None:
                why = f" (last error: {last})" if last is not None else ""
                raise EngineError(
                    f"no transcription server is in service{why}", "engine_unavailable"
                )
            current.backend = backend
            try:
                text = await self._post(backend, self._form(wav, language, prompt))
            except _Failed as failed:
                current.backend = None
                if failed.counts:
                    self._failed(backend)
                tried.append(backend)
                last = failed
                continue
            current.backend = None
            if self.pool.succeeded(backend):
                log.info("transcription server %s answers again: back in service", backend.url)
            return text
        assert last is not None
        raise EngineError(str(last), last.code)  # the worker says "transcription failed"

    def _form(self, wav: bytes, language: str | None, prompt: str | None) -> aiohttp.FormData:
        # Built per try: an aiohttp form can be sent once.
        form = aiohttp.FormData()
        if self._remote.model:
            form.add_field("model", self._remote.model)
        if language:
            form.add_field("language", language)
        if prompt:
            form.add_field("prompt", prompt)
        form.add_field("response_format", "json")
        form.add_field("file", wav, filename="utterance.wav", content_type="audio/wav")
        return form

    async def _post(self, backend: Backend, form: aiohttp.FormData) -> str:
        """One try on one server: its text, or ``_Failed`` (retry), or ``EngineError``."""
        assert self._http is not None, "RemoteEngine.start was not awaited"
        backend.in_flight += 1
        try:
            async with self._http.post(f"{backend.url}/audio/transcriptions", data=form) as resp:
                raw = await _read_bounded(resp)
                status = resp.status
        except (aiohttp.ClientError, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise _Failed(f"{backend.url}: {why}", "engine_unavailable", counts=True) from None
        finally:
            backend.in_flight -= 1
        if status in _BUSY:
            raise _Failed(f"{backend.url} is busy ({status})", "engine_unavailable", counts=False)
        if status >= 500:
            raise _Failed(f"{backend.url} answered {status}: {_snippet(raw)}", "engine_error", True)
        if status != 200:
            # The server is up and refuses this request (bad key, unknown model): retrying
            # would get the same answer.
            raise EngineError(f"{backend.url} refused the request ({status}): {_snippet(raw)}")
        try:
            body = json_guard.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise EngineError(f"{backend.url} answered without a text: {_snippet(raw)}")
        return str(body["text"]).strip()

    # -- out of service and back -----------------------------------------------------------

    def _failed(self, backend: Backend) -> None:
        if self.pool.failed(backend):
            log.warning(
                "transcription server %s failed %d times in a row: out of service until it "
                "answers a probe",
                backend.url,
                backend.failures,
            )
            self._watch(backend)

    def _watch(self, backend: Backend) -> None:
        if backend not in self._probes:
            self._probes[backend] = asyncio.create_task(
                self._probe_until_up(backend), name=f"probe {backend.url}"
            )

    async def _probe_until_up(self, backend: Backend) -> None:
        delay = PROBE_FIRST_S
        try:
            while True:
                await asyncio.sleep(delay)
                if await self._probe(backend):
                    if self.pool.succeeded(backend):
                        log.info(
                            "transcription server %s answers again: back in service", backend.url
                        )
                    return
                delay = min(delay * 2, PROBE_MAX_S)
        finally:
            self._probes.pop(backend, None)

    async def _probe(self, backend: Backend) -> bool:
        """Whether the server answers a transcription of silence. Any answer but a 5xx or a
        429 counts: a 4xx (a bad key) comes from a server that is up, and the utterances
        will say why they fail."""
        try:
            async with asyncio.timeout(min(PROBE_TIMEOUT_S, self._remote.timeout_s)):
                await self._post(backend, self._form(self._silence, None, None))
        except EngineError:
            return True
        except (_Failed, TimeoutError):
            return False
        return True


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    raw = bytearray()
    async for chunk in resp.content.iter_any():
        raw += chunk
        if len(raw) > MAX_ANSWER_BYTES:
            raise aiohttp.ClientPayloadError(f"answer over {MAX_ANSWER_BYTES} bytes")
    return bytes(raw)


def _snippet(raw: bytes) -> str:
    return raw[:200].decode("utf-8", "replace").strip()
