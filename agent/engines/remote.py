"""The remote engine: utterances go to OpenAI-compatible transcription servers over HTTP.

A gateway that terminates calls on cheap CPU boxes sends each utterance (finals, and
interims when they are on) to ``POST {base_url}/audio/transcriptions`` of vLLM serving
Voxtral, or of another voxtral-rtc, as a multipart 16 kHz mono 16-bit WAV with
``response_format=json``, and reads ``text``. (vLLM's ``stream=true`` answer is its own
``transcription.chunk`` SSE, not OpenAI's, and a whole utterance is short: ``json`` it is.)

It only waits, so it runs on the event loop (``AsyncEngine``): one pooled aiohttp session,
no thread per request, and a request whose utterance is withdrawn is really aborted (its
connection is closed, the server's handler sees its client leave).

The queue stays here, where finals go first and stale interims are skipped: the worker
starts no more requests than the servers run at once (``slots``: a voxtral-rtc node says
its number in ``X-Voxtral-Capacity``; ``engine.remote.max_concurrency`` per server caps it
and is the number for a server that does not say). Each request carries its priority
(``X-Voxtral-Priority: final|interim``), which a voxtral-rtc node that trusts its callers
queues by (``server.priority_hints``); other servers ignore the header.

Faults: a connection error or a 5xx is retried, backing off, on the least busy other
server when there is one, within the utterance's ``timeout_s`` (then ``engine_timeout``);
an interim is not retried (the next one is due soon). A server that fails
``backend_pool.FAILURE_THRESHOLD`` times in a row is taken out of service and probed in the
background until it answers again. A timeout alone is not a failure: a server that answered
anything while the request waited is busy, not dead, and keeps its place; one that did not
is probed at once, and taken out if the probe fails too. While every server is out,
utterances fail at once with ``engine_unavailable`` and the engine is ``degraded``
(``/readyz``, ``voxtral_rtc_engine_degraded``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import aiohttp
import numpy as np

from agent import json_guard
from agent.audio_formats import pcm16_wav
from agent.config import EngineConfig
from agent.engines.backend_pool import Backend, BackendPool
from agent.engines.base import SAMPLE_RATE, AsyncEngine, EngineRequest, EngineResult, Priority
from agent.errors import EngineError

log = logging.getLogger(__name__)

#: The request's priority, for a server that queues by it (a voxtral-rtc node):
#: ``final``, ``file`` or ``interim`` (``Priority`` names in lower case).
PRIORITY_HEADER = "X-Voxtral-Priority"
#: A voxtral-rtc node's answers say how many requests it runs at once.
CAPACITY_HEADER = "X-Voxtral-Capacity"
#: Idle pooled connections are closed after this long: shorter than the servers' own
#: keep-alive (uvicorn, under vLLM, closes at 5 s; voxtral-rtc at 15 s), so a request never
#: goes out on a connection the server is closing at that moment.
KEEPALIVE_S = 4.0
#: A probe is half a second of silence: any server answers it quickly (a voxtral-rtc node's
#: VAD finds no speech in it, so it never waits for the node's engine).
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

Probed = Literal["up", "busy", "down"]


def backoff_s(retry: int) -> float:
    """Wait before retry number ``retry`` (0-based): 0.1, 0.2, 0.4 ... 2 s."""
    return float(min(BACKOFF_FIRST_S * 2**retry, BACKOFF_MAX_S))


def priority_hint(priority: Priority) -> str:
    """The ``X-Voxtral-Priority`` value for ``priority``."""
    return priority.name.lower()


def parse_priority_hint(value: str | None) -> Priority | None:
    """``X-Voxtral-Priority``'s priority, or None when absent or not one of the names."""
    if not value:
        return None
    return Priority.__members__.get(value.strip().upper())


class _Failed(Exception):
    """One try failed in a way worth retrying; ``code`` is the item's code if it was the last."""

    def __init__(self, message: str, code: str, counts: bool) -> None:
        super().__init__(message)
        self.code = code
        #: Whether it counts against the server's circuit (busy answers do not).
        self.counts = counts


@dataclass(eq=False)
class _Try:
    """The server a request is waiting on right now, and its answers count when the request
    went there: for the timeout to tell a busy server from a dead one."""

    backend: Backend | None = None
    answers: int = 0


class RemoteEngine(AsyncEngine):
    def __init__(self, config: EngineConfig) -> None:
        remote = config.remote
        self._remote = remote
        self._language = config.language or None
        self.name = f"remote:{remote.model}" if remote.model else "remote"
        self.max_concurrency = remote.max_concurrency
        self.pool = BackendPool(remote.base_url, max_per_backend=remote.max_concurrency)
        self._http: aiohttp.ClientSession | None = None
        self._probes: dict[Backend, asyncio.Task[None]] = {}
        self._silence = pcm16_wav(np.zeros(int(SAMPLE_RATE * PROBE_AUDIO_S), np.float32))

    @property
    def slots(self) -> int:
        return self.pool.capacity

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pool and probe every server once (which also learns the capacity a node
        says). One that does not answer starts out of service (the gateway still starts,
        degraded if none answers): the inference fleet may come up after the gateways."""
        backends = len(self.pool.backends)
        connector = aiohttp.TCPConnector(
            limit=(self.max_concurrency + 1) * backends,  # + one probe per server
            keepalive_timeout=KEEPALIVE_S,
        )
        headers = (
            {"Authorization": f"Bearer {self._remote.api_key}"} if self._remote.api_key else {}
        )
        # trust_env=False: requests go to the configured servers, never to an environment proxy.
        self._http = aiohttp.ClientSession(connector=connector, headers=headers, trust_env=False)
        answers = await asyncio.gather(*(self._probe(b) for b in self.pool.backends))
        for backend, answer in zip(self.pool.backends, answers, strict=True):
            if answer == "up":
                log.info("transcription server %s answers (%d at once)", backend.url, backend.slots)
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

    async def transcribe_one(self, request: EngineRequest, priority: Priority) -> EngineResult:
        wav = pcm16_wav(request.audio)
        language = request.language or self._language
        current = _Try()
        # A failed interim is not worth a retry: the next one is due within an interval.
        retries = 0 if priority is Priority.INTERIM else self._remote.retries
        try:
            async with asyncio.timeout(self._remote.timeout_s):
                text = await self._tries(wav, language, request.prompt, priority, retries, current)
        except TimeoutError:
            if current.backend is not None:
                self._timed_out(current.backend, current.answers)
            raise EngineError(
                f"no transcription within engine.remote.timeout_s ({self._remote.timeout_s:g} s)",
                "engine_timeout",
            ) from None
        return EngineResult(text, language)

    async def _tries(
        self,
        wav: bytes,
        language: str | None,
        prompt: str | None,
        priority: Priority,
        retries: int,
        current: _Try,
    ) -> str:
        tried: list[Backend] = []
        last: _Failed | None = None
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(backoff_s(attempt - 1))
            backend = self.pool.choose(avoid=tried)
            if backend is None:
                why = f" (last error: {last})" if last is not None else ""
                raise EngineError(
                    f"no transcription server is in service{why}", "engine_unavailable"
                )
            current.backend, current.answers = backend, backend.answers
            try:
                text = await self._post(backend, self._form(wav, language, prompt), priority)
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
        code = "interim_skipped" if priority is Priority.INTERIM and not last.counts else last.code
        raise EngineError(str(last), code)  # the worker says "transcription failed"

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

    async def _post(self, backend: Backend, form: aiohttp.FormData, priority: Priority) -> str:
        """One try on one server: its text, or ``_Failed`` (retry), or ``EngineError``."""
        assert self._http is not None, "RemoteEngine.start was not awaited"
        url = f"{backend.url}/audio/transcriptions"
        headers = {PRIORITY_HEADER: priority_hint(priority)}
        backend.in_flight += 1
        try:
            async with self._http.post(url, data=form, headers=headers) as resp:
                raw = await _read_bounded(resp)
                status = resp.status
                capacity = resp.headers.get(CAPACITY_HEADER, "")
        except (aiohttp.ClientError, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise _Failed(f"{backend.url}: {why}", "engine_unavailable", counts=True) from None
        finally:
            backend.in_flight -= 1
        self.pool.answered(backend)
        if capacity.isdigit():
            self.pool.advertised(backend, int(capacity))
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

    def _timed_out(self, backend: Backend, answers_then: int) -> None:
        """A request passed ``timeout_s`` on ``backend``. If the server answered others
        meanwhile it is only busy (its queue is long): taking it out of service would fail
        the finals it is about to deliver. Otherwise it may be dead or stalled: probe it."""
        if backend.answers > answers_then:
            log.info("transcription server %s is behind (a request timed out)", backend.url)
            return
        self._watch(backend, verify=True)

    def _watch(self, backend: Backend, verify: bool = False) -> None:
        if backend not in self._probes:
            self._probes[backend] = asyncio.create_task(
                self._supervise(backend, verify), name=f"probe {backend.url}"
            )

    async def _supervise(self, backend: Backend, verify: bool) -> None:
        """With ``verify``: probe a server in service once, and take it out if the probe
        fails. Then, while it is out of service, probe it until it answers."""
        try:
            if verify:
                answer = await self._probe(backend)
                if answer == "up":
                    if self.pool.succeeded(backend):
                        log.info("transcription server %s answers: back in service", backend.url)
                    return
                if answer == "down" and self.pool.take_out(backend):
                    log.warning(
                        "transcription server %s timed out and failed a probe: out of service "
                        "until it answers one",
                        backend.url,
                    )
                if not backend.open:
                    return  # busy, and still in service
            delay = PROBE_FIRST_S
            while True:
                await asyncio.sleep(delay)
                if await self._probe(backend) == "up":
                    if self.pool.succeeded(backend):
                        log.info(
                            "transcription server %s answers again: back in service", backend.url
                        )
                    return
                delay = min(delay * 2, PROBE_MAX_S)
        finally:
            self._probes.pop(backend, None)

    async def _probe(self, backend: Backend) -> Probed:
        """Whether the server answers a transcription of silence: ``up`` for any answer but
        a 5xx or a 429 (a 4xx, a bad key, comes from a server that is up, and the utterances
        will say why they fail), ``busy`` for a 429 or 503, else ``down``."""
        try:
            async with asyncio.timeout(min(PROBE_TIMEOUT_S, self._remote.timeout_s)):
                await self._post(backend, self._form(self._silence, None, None), Priority.FINAL)
        except EngineError:
            return "up"
        except _Failed as failed:
            return "down" if failed.counts else "busy"
        except TimeoutError:
            return "down"
        return "up"


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    raw = bytearray()
    async for chunk in resp.content.iter_any():
        raw += chunk
        if len(raw) > MAX_ANSWER_BYTES:
            raise aiohttp.ClientPayloadError(f"answer over {MAX_ANSWER_BYTES} bytes")
    return bytes(raw)


def _snippet(raw: bytes) -> str:
    return raw[:200].decode("utf-8", "replace").strip()
