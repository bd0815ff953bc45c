"""Live-call latency: end of speech -> final transcript at a real client, 1..N streams, over
WebRTC or the OpenAI Realtime WebSocket.

Plays a WAV over N simultaneous streams against a server started as a subprocess (default;
its CPU time is then measured alone from ``/proc/PID/stat``) or in this process, all on
127.0.0.1, and times the events at the client. ``--transport webrtc`` (default): aiortc
calls (real Opus, ICE/DTLS/SCTP), events on the data channel. ``--transport ws``:
``/v1/realtime?intent=transcription`` sockets sending ``input_audio_buffer.append`` of pcm16
24 kHz (resampled by soxr, as Pipecat does) every 50 ms, paced by the clock, then silence
until closed.
``--transport both`` alternates the two within each repetition, on one server::

    .venv/bin/python bench/latency.py --calls 1 8 --repeat 2
    .venv/bin/python bench/latency.py --transport both --calls 1 4 --repeat 3 --quiet-pct 25

Reference times come from an offline pass of the same VAD + segmenter (same options) over the
source file: offline utterance ``k`` has an onset and an end in file time, which the client's
send clock turns into wall time (``started_at + ms / 1000``: the first frame or append left
at ``started_at``; the server's audio clock starts at that first frame or append). Each final
event is matched to the offline utterance whose end is nearest to the event's own
``speech_stopped`` ``audio_end_ms``. Reported per transport and stream count (pooled over
streams and repeats, and per run), p50 / p95:

* end of speech -> ``...transcription.completed`` arrival, split with the server's ``timings``
  into VAD hangover, queue, engine, server (decision -> event sent) and transport/other
  (= client latency - vad_ms - server_ms: RTP + jitter buffer + decode + VAD backlog + SCTP,
  or TCP + base64 + resampling + VAD backlog);
* speech onset -> ``speech_started`` arrival (and -> first ``delta`` when the engine sends any);
* transcripts received / expected, failed, missing, ``error`` events, events out of turn;
  server CPU in % of one core per stream.

Stream starts are staggered by a uniform random 0..``--stagger-ms`` (fixed seed): near-
simultaneous (the worst case for a single engine worker) without every stream's utterance
ends falling into the same 32 ms window, which no real traffic does. Each chunk leaves at the
start of the audio it holds (a 20 ms frame, a 50 ms append), so a live microphone, which can
only send a chunk once it is recorded, would add up to one chunk to every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import Config
from agent.detector import SpeechDetector
from agent.segmenter import SegmenterOptions, SpeechStarted, Utterance
from agent.transports.webrtc_peer import restrict_host_addresses
from agent.vad import SileroVad
from bench.common import (
    LOOPBACK,
    REPO_ROOT,
    ServerHandle,
    add_run_args,
    audio_header,
    check_run_args,
    free_port,
    inprocess_server,
    loopback_config,
    machine_info,
    markdown_table,
    process_cpu_seconds,
    report_header,
    run_bench,
    subprocess_server,
    summarize,
    system_busy_seconds,
    wait_idle,
    wait_quiet,
    word_errors,
)
from bench.socket_clients import (
    CONNECT_TIMEOUT_S,
    PacedSocketClient,
    TwilioAudio,
    TwilioClient,
    WsAudio,
    WsClient,
)
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient, ReceivedEvent, read_audio
from voxtral_rtc_client.text import normalise

EV = "conversation.item.input_audio_transcription"
CLOSE_TIMEOUT_S = 10.0
#: Keep a call open this long after the file's last sample left, for the last cut to happen.
SETTLE_AFTER_AUDIO_S = 1.0
TRANSPORTS = ("webrtc", "ws", "twilio")
#: ``--transport both``: the two transports it has meant since before Twilio.
BOTH = ("webrtc", "ws")
METRICS = (
    "end_to_final_ms",
    "onset_to_started_ms",
    "onset_to_first_delta_ms",
    "end_to_stopped_ms",
    "vad_ms",
    "queue_ms",
    "engine_ms",
    "server_ms",
    "transport_other_ms",
    "end_offset_ms",
    "beyond_target_ms",
    "decode_after_ms",
)

#: Engine settings shown in the markdown (the JSON has the whole configuration).
ENGINE_KEYS = ("kind", "beam_size", "cpu_threads", "max_batch", "lanes", "interim_interval_ms")
#: Event type -> the name under which an item keeps its first event of that type.
SLOTS = {
    "input_audio_buffer.speech_started": "started",
    "input_audio_buffer.speech_stopped": "stopped",
    f"{EV}.delta": "delta",
    f"{EV}.completed": "completed",
    f"{EV}.failed": "failed",
}


@dataclass(frozen=True)
class OfflineUtterance:
    index: int
    start_ms: int  # speech onset (first speech window)
    end_ms: int  # end of the last speech window


def offline_utterances(samples: Any, config: Config) -> list[OfflineUtterance]:
    """The server's own VAD + segmenter, with its options, over the file's 512-sample windows."""
    options = SegmenterOptions.from_config(config.vad, config.segmenter)
    detector = SpeechDetector(SileroVad(config.vad.model_path).stream(), options)
    onsets: dict[int, int] = {}
    found: list[OfflineUtterance] = []
    for ev in [*detector.process(samples), *detector.flush()]:
        if isinstance(ev, SpeechStarted):
            onsets[ev.index] = ev.start_ms
        elif isinstance(ev, Utterance):
            found.append(OfflineUtterance(ev.index, onsets.get(ev.index, ev.start_ms), ev.end_ms))
    return found


class TimedTrack(ArrayAudioTrack):
    """``ArrayAudioTrack`` that records how late each frame left against its nominal time."""

    def __init__(self, samples: Any) -> None:
        super().__init__(samples)
        self.max_lateness_ms = 0.0

    async def recv(self) -> av.AudioFrame:
        frame = await super().recv()
        assert self.started_at is not None and frame.pts is not None
        late = (time.perf_counter() - self.started_at - frame.pts / frame.sample_rate) * 1000
        self.max_lateness_ms = max(self.max_lateness_ms, late)
        return frame


class SendClock(Protocol):
    """The audio sender of one stream: when its first sample left, and its worst lateness."""

    @property
    def started_at(self) -> float | None: ...

    @property
    def max_lateness_ms(self) -> float: ...


class EventSource(Protocol):
    received: list[ReceivedEvent]

    async def next_event(
        self, type_: str | None = None, timeout: float = 30.0
    ) -> ReceivedEvent: ...


@dataclass
class CallOutcome:
    call: int
    stagger_ms: float
    transport: str = "webrtc"
    connect_ms: float | None = None
    error: str | None = None
    #: The first few ``error`` events the server sent (none expected).
    errors: list[str] = field(default_factory=list)
    max_send_lateness_ms: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    #: Every ``completed`` transcript of the stream, in arrival order, joined.
    transcript: str = ""
    #: Word errors of ``transcript`` against the reference, and the reference's words.
    word_errors: int | None = None
    reference_words: int | None = None
    #: Twilio only: the call's SID, how the server closed the stream and the subscriber.
    phone: dict[str, Any] | None = None


# -- one call ------------------------------------------------------------------------------


async def run_call(
    url: str,
    config: Config,
    samples: Any,
    call: int,
    stagger_s: float,
    tail_s: float,
    socket_audio: WsAudio | TwilioAudio | None = None,
) -> tuple[CallOutcome, list[ReceivedEvent], float | None]:
    """Connect after ``stagger_s``, play the file, stay until every started item is final.

    Over WebRTC (an aiortc call, ``socket_audio`` None), over ``/v1/realtime``
    (``WsAudio``: the file's appends) or as a Twilio phone stream with a subscriber on the
    call's events (``TwilioAudio``: the file's mu-law). Returns the outcome, the events
    received and the send clock's start (when the first sample left)."""
    transport = {WsAudio: "ws", TwilioAudio: "twilio"}.get(type(socket_audio), "webrtc")
    outcome = CallOutcome(call, round(stagger_s * 1000, 1), transport)
    await asyncio.sleep(stagger_s)
    client: RealtimeClient | PacedSocketClient
    clock: SendClock
    if isinstance(socket_audio, WsAudio):
        client = clock = WsClient(url, socket_audio)
        connect = client.connect()
    elif isinstance(socket_audio, TwilioAudio):
        client = clock = TwilioClient(url, socket_audio)
        connect = client.connect()
    else:
        track = TimedTrack(samples)
        client, clock = RealtimeClient(url), track  # no ICE servers: loopback only
        connect = client.connect(track)
    audio_s = len(samples) / 16_000
    try:
        t0 = time.perf_counter()
        await asyncio.wait_for(connect, CONNECT_TIMEOUT_S)
        outcome.connect_ms = round((time.perf_counter() - t0) * 1000, 1)
        deadline = time.perf_counter() + audio_s + tail_s
        if not await _wait_finals(client, clock, audio_s, deadline):
            outcome.error = f"not all finals within {audio_s + tail_s:.0f} s"
    except (TimeoutError, RuntimeError, OSError, aiohttp.ClientError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"  # a failed call is a result, not a crash
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), CLOSE_TIMEOUT_S)
    if isinstance(client, PacedSocketClient) and client.send_error and outcome.error is None:
        outcome.error = f"sending audio failed: {client.send_error}"
    if isinstance(client, TwilioClient):
        outcome.phone = {
            "call_sid": client.call_sid,
            "subscribe_attempts": client.subscribe_attempts,
            # stop -> both sockets closed by the server (the flush of the open utterance).
            "close_ms": client.close_ms,
            "stream_close_code": client.stream_closed,
            "subscriber_close_code": client.subscriber_closed,
            "messages_to_twilio": client.sent_to_twilio,
        }
    outcome.max_send_lateness_ms = round(clock.max_lateness_ms, 1)
    return outcome, client.received, clock.started_at


async def _wait_finals(
    client: EventSource, clock: SendClock, audio_s: float, deadline: float
) -> bool:
    open_items: set[str] = set()
    while True:
        now = time.perf_counter()
        started = clock.started_at
        if started is not None and now >= started + audio_s + SETTLE_AFTER_AUDIO_S:
            if not open_items:
                return True
        if now >= deadline:
            return False
        try:
            ev = await client.next_event(timeout=max(0.01, min(0.1, deadline - now)))
        except TimeoutError:
            continue
        item = str(ev.event.get("item_id"))
        if ev.type in ("input_audio_buffer.speech_started", "input_audio_buffer.committed"):
            open_items.add(item)
        elif ev.type in (f"{EV}.completed", f"{EV}.failed"):
            open_items.discard(item)


def analyse_call(
    outcome: CallOutcome,
    received: list[ReceivedEvent],
    started_at: float | None,
    offline: list[OfflineUtterance],
    tolerance_ms: float,
    reference: str | None = None,
) -> None:
    """Match finals to offline utterances and compute each one's latencies (into ``outcome``);
    the stream's transcript (its ``completed`` in arrival order) and, given the
    ``reference`` text, its word errors."""
    items: dict[str, dict[str, Any]] = {}
    for r in received:
        item_id = r.event.get("item_id")
        if item_id is None:
            continue
        slot = items.setdefault(str(item_id), {})
        key = SLOTS.get(r.type)
        if key is not None:
            slot.setdefault(key, r)  # the first of each kind: the first delta, in particular
    finals = {k: v for k, v in items.items() if "completed" in v or "failed" in v}
    # One-to-one, nearest first: the event's own audio_end_ms against offline ends.
    pairs = []
    for item_id, slot in finals.items():
        end = _online_end_ms(slot)
        for off in offline:
            if end is not None and abs(end - off.end_ms) <= tolerance_ms:
                pairs.append((abs(end - off.end_ms), item_id, off.index))
    matched: dict[str, OfflineUtterance] = {}
    used: set[int] = set()
    by_index = {o.index: o for o in offline}
    for _, item_id, index in sorted(pairs):
        if item_id not in matched and index not in used:
            matched[item_id] = by_index[index]
            used.add(index)
    failed = sum(1 for v in finals.values() if "completed" not in v)
    empty = 0
    for item_id, off in sorted(matched.items(), key=lambda kv: kv[1].index):
        slot = finals[item_id]
        if "completed" not in slot or started_at is None:
            continue
        done = slot["completed"]
        timings: dict[str, float] = done.event.get("timings") or {}
        text = str(done.event.get("transcript", ""))
        empty += not text.strip()
        end_at = started_at + off.end_ms / 1000
        onset_at = started_at + off.start_ms / 1000
        latency = (done.at - end_at) * 1000
        vad, server = timings.get("vad_ms"), timings.get("server_ms")
        rec: dict[str, Any] = {
            "call": outcome.call,
            "utterance": off.index,
            "transcript": text,
            "speculative": bool(done.event.get("speculative", False)),
            "offline_start_ms": off.start_ms,
            "offline_end_ms": off.end_ms,
            "end_offset_ms": _diff(_online_end_ms(slot), off.end_ms),
            "end_to_final_ms": latency,
            "onset_to_started_ms": _since(slot.get("started"), onset_at),
            "onset_to_first_delta_ms": _since(slot.get("delta"), onset_at),
            "end_to_stopped_ms": _since(slot.get("stopped"), end_at),
            **{k: timings.get(k) for k in ("vad_ms", "queue_ms", "engine_ms", "server_ms")},
            "transport_other_ms": None if vad is None or server is None else latency - vad - server,
            # The streaming target: end -> final <= max(hangover, this final's engine time) + 50.
            "beyond_target_ms": _beyond(latency, vad, timings.get("engine_ms")),
            # Audio time from the end of speech to the start of the final's decode.
            "decode_after_ms": timings.get("decode_after_ms"),
        }
        outcome.records.append(
            {k: round(v, 1) if isinstance(v, float) else v for k, v in rec.items()}
        )
    got = sum(1 for item_id in matched if "completed" in finals[item_id])
    outcome.counts = {
        "expected": len(offline),
        "completed": got,
        "failed": failed,
        "missing": len(offline) - len(used),
        "unmatched": len(finals) - len(matched),
        "empty": empty,
        "error_events": sum(1 for r in received if r.type == "error"),
        "out_of_turn": _out_of_turn(received),
        "untagged": _untagged(outcome, received),
    }
    outcome.transcript = " ".join(
        str(r.event.get("transcript", "")).strip() for r in received if r.type == f"{EV}.completed"
    ).strip()
    if reference is not None:
        outcome.word_errors, outcome.reference_words = word_errors(outcome.transcript, reference)
    outcome.errors = [str(r.event.get("error")) for r in received if r.type == "error"][:5]


def _out_of_turn(received: list[ReceivedEvent]) -> int:
    """Events of an item that arrived while an earlier item (by ``speech_started``) had no
    ``completed``/``failed`` yet: deltas and finals should come item by item."""
    started: list[str] = []
    done: set[str] = set()
    bad = 0
    for r in received:
        item = r.event.get("item_id")
        if item is None:
            continue
        item = str(item)
        if r.type == "input_audio_buffer.speech_started":
            started.append(item)
        elif r.type in (f"{EV}.delta", f"{EV}.completed", f"{EV}.failed"):
            earlier = started[: started.index(item)] if item in started else []
            bad += any(e not in done for e in earlier)
            if r.type != f"{EV}.delta":
                done.add(item)
    return bad


def _untagged(outcome: CallOutcome, received: list[ReceivedEvent]) -> int:
    """Twilio only: events on the call's subscriber socket without ``track`` or with a
    ``call_sid`` other than the call's (every event of a call must carry both)."""
    if outcome.phone is None:
        return 0
    sid = outcome.phone["call_sid"]
    return sum(1 for r in received if "track" not in r.event or r.event.get("call_sid") != sid)


def _online_end_ms(slot: dict[str, Any]) -> float | None:
    if "stopped" in slot:
        return float(slot["stopped"].event["audio_end_ms"])
    timings = slot["completed"].event.get("timings", {}) if "completed" in slot else {}
    end = timings.get("speech_end_ms")
    return None if end is None else float(end)


def _since(received: Any, reference: float) -> float | None:
    return None if received is None else (received.at - reference) * 1000


def _diff(a: float | None, b: float) -> float | None:
    return None if a is None else a - b


# -- one phase: N calls at once ------------------------------------------------------------


async def run_phase(
    server: ServerHandle,
    config: Config,
    samples: Any,
    offline: list[OfflineUtterance],
    n_calls: int,
    repeat: int,
    args: argparse.Namespace,
    transport: str = "webrtc",
) -> dict[str, Any]:
    """``n_calls`` streams at once over ``transport`` (``webrtc``: aiortc calls; ``ws``:
    ``/v1/realtime`` sockets; ``twilio``: phone streams, events from a subscriber each), the
    server's CPU read around them; the phase's figures."""
    # Sockets too: a run that alternates transports starts each phase on an idle server.
    await wait_idle(server.url, sockets=True)
    quiet: tuple[float, float] | None = None
    if getattr(args, "quiet_pct", 0) > 0:  # a shared machine: start when others are quiet
        quiet = await wait_quiet(args.quiet_pct, args.quiet_wait_s)
    rng = random.Random(f"{args.seed}:{n_calls}:{repeat}")
    staggers = [rng.uniform(0, args.stagger_ms / 1000) for _ in range(n_calls)]
    audio_s = len(samples) / 16_000
    tail_s = args.tail_timeout_s or 20 + 1.5 * n_calls * len(offline)
    socket_audio: WsAudio | TwilioAudio | None = None
    if transport == "ws":
        socket_audio = WsAudio(samples, getattr(args, "ws_chunk_ms", 50))
    elif transport == "twilio":
        socket_audio = TwilioAudio(samples)
    cpu0, own0, busy0 = server.cpu_seconds(), process_cpu_seconds(), system_busy_seconds()
    t0 = time.perf_counter()
    coros = [
        run_call(server.url, config, samples, i, s, tail_s, socket_audio)
        for i, s in enumerate(staggers)
    ]
    bound = CONNECT_TIMEOUT_S + audio_s + tail_s + CLOSE_TIMEOUT_S + 30
    results = await asyncio.wait_for(asyncio.gather(*coros), bound)
    await wait_idle(server.url, sockets=True)
    cpu1, own1, busy1 = server.cpu_seconds(), process_cpu_seconds(), system_busy_seconds()
    wall = time.perf_counter() - t0
    calls = []
    session: dict[str, Any] | None = None
    for outcome, received, started_at in results:
        analyse_call(
            outcome,
            received,
            started_at,
            offline,
            args.match_tolerance_ms,
            getattr(args, "reference_text", None),
        )
        calls.append(outcome)
        created = [r.event for r in received if r.type == "session.created"]
        session = session or (created[0].get("session") if created else None)
    server_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    phase: dict[str, Any] = {
        "transport": transport,
        "calls": n_calls,
        "repeat": repeat,
        # --quiet-pct: seconds waited for the machine to quiet down, its busy % then.
        "quiet_wait_s": None if quiet is None else quiet[0],
        "busy_before_pct": None if quiet is None else quiet[1],
        # ``session.created``'s session (format, turn detection), as the server announced it.
        "session": session,
        "wall_s": round(wall, 2),
        "tail_timeout_s": tail_s,
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 2),
        # CPU seconds / (calls x seconds of the file's audio), in % of one core.
        "server_cpu_pct_per_call": None
        if server_cpu is None
        else round(100 * server_cpu / (n_calls * audio_s), 1),
        "server_load_pct": None if server_cpu is None else round(100 * server_cpu / wall, 1),
        "bench_cpu_pct": round(100 * (own1 - own0) / wall, 1),
        # Everything else the machine ran meanwhile: how noisy the measurement was.
        "other_cpu_pct": round(100 * (busy1 - busy0 - (server_cpu or 0) - (own1 - own0)) / wall, 1),
        **_engine_batches([r for c in calls for r in c.records], wall),
        "counts": _total_counts(calls),
        "summary": _summaries([r for c in calls for r in c.records]),
        "wer": pooled_wer(calls),
        "call_results": [asdict(c) for c in calls],
    }
    s, c = phase["summary"]["end_to_final_ms"], phase["counts"]
    wer = "" if phase["wer"]["pct"] is None else f"WER {phase['wer']['pct']} %; "
    print(
        f"  {transport} {n_calls} stream(s), run {repeat}: {c['completed']}/{c['expected']} "
        f"finals, "
        f"failed {c['failed']}, missing {c['missing']}; end->final p50 {s['p50']} "
        f"p95 {s['p95']} ms; server CPU {phase['server_cpu_pct_per_call'] or '-'} %/call; "
        f"{wer}{wall:.1f} s",
        file=sys.stderr,
    )
    return phase


def pooled_wer(calls: list[Any]) -> dict[str, Any]:
    """Word errors summed over streams / reference words summed (``pct``: WER in %), and
    how many streams had each distinct (normalised) transcript; ``calls`` are
    ``CallOutcome``s or their dicts."""
    rows = [c if isinstance(c, dict) else asdict(c) for c in calls]
    scored = [r for r in rows if r.get("word_errors") is not None]
    errors = sum(r["word_errors"] for r in scored)
    words = sum(r["reference_words"] for r in scored)
    heard = Counter(normalise(r.get("transcript", "")) for r in scored)
    return {
        "streams": len(scored),
        "errors": errors,
        "words": words,
        "pct": round(100 * errors / words, 1) if words else None,
        "transcripts": dict(heard.most_common()),
    }


def _engine_batches(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Batches seen in the finals: the worker gives every item of a batch the batch's wall
    time as ``engine_ms``, so equal values (0.1 ms resolution) are one batch. Interim decodes
    send no timings, so the busy share counts finals only."""
    sizes = Counter(r["engine_ms"] for r in records if r.get("engine_ms") is not None)
    busy_s = sum(sizes) / 1000
    return {
        "engine_batches": len(sizes),
        "engine_mean_batch": round(sum(sizes.values()) / len(sizes), 2) if sizes else None,
        "engine_busy_pct": round(100 * busy_s / wall_s, 1),
    }


def _total_counts(calls: list[CallOutcome]) -> dict[str, int]:
    keys = (
        "expected",
        "completed",
        "failed",
        "missing",
        "unmatched",
        "empty",
        "error_events",
        "out_of_turn",
        "untagged",
    )
    total = {k: sum(c.counts.get(k, 0) for c in calls) for k in keys}
    total["call_errors"] = sum(1 for c in calls if c.error)
    return total


def _summaries(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m: summarize(r[m] for r in records if r.get(m) is not None).as_dict() for m in METRICS}


def _beyond(latency: float, vad: float | None, engine: float | None) -> float | None:
    """How far past the longer of hangover and engine time the final arrived (ms)."""
    if vad is None or engine is None:
        return None
    return latency - max(vad, engine)


# -- report --------------------------------------------------------------------------------


SUMMARY_HEADERS = (
    "transport",
    "streams",
    "n",
    "finals",
    "failed",
    "missing",
    "end of speech → final",
    "onset → speech_started",
    "onset → first delta",
    "end → final decode starts (audio)",
    "final − max(hangover, engine)",
    "server CPU % core/stream",
)
COMPARE_HEADERS = (
    "transport",
    "streams",
    "runs",
    "finals",
    "end → completed p50 / p95",
    "per-run p50",
    "per-run p95",
    "server CPU % core/stream",
    "per run",
)
SPLIT_HEADERS = (
    "transport",
    "streams",
    "→ speech_stopped",
    "VAD hangover",
    "queue",
    "engine",
    "server",
    "transport/other",
    "total",
)
SPLIT_METRICS = METRICS[3:9]  # end_to_stopped .. transport_other, in SPLIT_HEADERS order
WER_HEADERS = (
    "transport",
    "streams",
    "runs",
    "streams scored",
    "word errors / words",
    "WER %",
    "transcripts heard (normalised) × streams",
)
RUN_HEADERS = (
    "transport",
    "streams",
    "run",
    "finals",
    "end → final p50 / p95",
    "server CPU % core/stream",
    "server load %",
    "bench CPU %",
    "other CPU %",
    "engine busy %",
    "mean batch",
    "wall s",
    "max send lateness ms",
    "errors / out of turn / untagged",
)
NOTES = (
    "Split of end of speech → final: *server* = end-of-speech decision → event sent (queue + "
    "engine + hand-off; shorter than *engine* when a speculative final started at the pause, "
    "before the decision); *transport/other* = client latency − VAD hangover − server "
    "(WebRTC: RTP, jitter buffer, Opus decode, VAD backlog, SCTP, client event loop; WS: TCP, "
    "base64 + resampling, VAD backlog, client event loop). *engine* is the wall time of the "
    "whole batch the utterance ran in. *streams* = simultaneous WebRTC calls, /v1/realtime "
    "sockets or Twilio phone streams (one track each). *server CPU % core/stream* = server process"
    " CPU seconds / (streams × file seconds) × 100; *server load %* = its CPU seconds / wall "
    "seconds of the run; *bench CPU %* = the same for this process (the clients); *other CPU %* ="
    " the rest of the machine's busy time meanwhile (other processes: noise); *end → final decode "
    "starts* = audio time from the end of speech to the pause that started the final's decode "
    "(the hangover when it was not speculative); *engine busy %* = "
    "summed wall times of the finals' batches (all lanes) / wall seconds of the run (interim "
    "decodes not included); *mean batch* = utterances per engine batch (items of one batch share "
    "its ``engine_ms``); *errors / out of turn / untagged* = ``error`` events received / events "
    "of an item (delta, completed) that arrived before an earlier item's final / Twilio: events "
    "at the subscriber without ``track`` or with another ``call_sid`` (all expected 0). Over "
    "Twilio, *transport/other* also holds mu-law decoding and the 8 → 16 kHz resampler, and "
    "the hub's fan-out to the subscriber socket."
)


def render(report: dict[str, Any]) -> str:
    cfg, args, machine = report["config"], report["args"], report["machine"]
    load = machine["load_avg_1m"]
    engine = ", ".join(f"{k} {cfg['engine'][k]}" for k in ENGINE_KEYS if k in cfg["engine"])
    summary_rows, split_rows = [], []
    compare_rows = []
    for agg in report["by_calls"].values():
        s, c = agg["summary"], agg["counts"]
        cpu = agg["server_cpu_pct_per_call"]
        t, n = agg["transport"], agg["calls"]
        compare_rows.append(
            [
                t,
                n,
                agg["runs"],
                f"{c['completed']}/{c['expected']}",
                _cell(s["end_to_final_ms"]),
                ", ".join(f"{v:.0f}" for v in agg["run_p50"]),
                ", ".join(f"{v:.0f}" for v in agg["run_p95"]),
                "—" if cpu is None else f"{cpu:.1f}",
                ", ".join(f"{v:.1f}" for v in agg["run_cpu_pct_per_call"]),
            ]
        )
        summary_rows.append(
            [
                t,
                n,
                s["end_to_final_ms"]["n"],
                f"{c['completed']}/{c['expected']}",
                c["failed"],
                c["missing"],
                _cell(s["end_to_final_ms"]),
                _cell(s["onset_to_started_ms"]),
                _cell(s["onset_to_first_delta_ms"]),
                _cell(s["decode_after_ms"]),
                _cell(s["beyond_target_ms"]),
                "—" if cpu is None else f"{cpu:.1f}",
            ]
        )
        split_rows.append(
            [t, n, *(_cell(s[m]) for m in SPLIT_METRICS), _cell(s["end_to_final_ms"])]
        )
    run_rows = [
        [
            p.get("transport", "webrtc"),
            p["calls"],
            p["repeat"],
            f"{p['counts']['completed']}/{p['counts']['expected']}",
            _cell(p["summary"]["end_to_final_ms"]),
            p["server_cpu_pct_per_call"],
            p["server_load_pct"],
            p["bench_cpu_pct"],
            p.get("other_cpu_pct"),
            p["engine_busy_pct"],
            p["engine_mean_batch"],
            p["wall_s"],
            max(c["max_send_lateness_ms"] for c in p["call_results"]),
            f"{p['counts'].get('error_events', 0)} / {p['counts'].get('out_of_turn', 0)} / "
            f"{p['counts'].get('untagged', 0)}",
        ]
        for p in report["phases"]
    ]
    stagger = (
        f"by uniform 0–{args['stagger_ms']:.0f} ms (seed {args['seed']})"
        if args["stagger_ms"]
        else "not at all"
    )
    transports = " and ".join(dict.fromkeys(p.get("transport", "webrtc") for p in report["phases"]))
    order = (
        "; the transports alternate within each repetition (order flipped every other one)"
        if len(parse_transports(args.get("transport", "webrtc"))) > 1
        else ""
    )
    wer_rows = [
        [
            agg["transport"],
            agg["calls"],
            agg["runs"],
            agg["wer"]["streams"],
            f"{agg['wer']['errors']}/{agg['wer']['words']}",
            f"**{agg['wer']['pct']:.1f}**",
            "; ".join(f"{k} ×{v}" for k, v in agg["wer"]["transcripts"].items()),
        ]
        for agg in report["by_calls"].values()
        if agg.get("wer", {}).get("pct") is not None
    ]
    phone = [c["phone"] for p in report["phases"] for c in p["call_results"] if c.get("phone")]
    lines = [
        "# Live-call latency (bench/latency.py)",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), no GPU used; "
        f"1-min load average {load[0]:.2f} before, {load[1]:.2f} after",
        f"- server: {report['server_mode']}; engine {report['engine']} ({engine}); "
        f"VAD {cfg['vad']['kind']} (threshold {cfg['vad']['threshold']}, "
        f"hangover {cfg['segmenter']['min_silence_ms']} ms)",
        f"- audio: {report['audio']['path']} ({report['audio']['seconds']} s, "
        f"{len(report['offline'])} utterances offline); stream starts staggered {stagger}; "
        f"{args['repeat']} run(s) per stream count and transport",
        *(
            [
                f"- each run started once the whole machine was at most {args['quiet_pct']:g} % "
                f"busy over 1 s (waited up to {args['quiet_wait_s']:g} s; per run in the JSON)"
            ]
            if args.get("quiet_pct")
            else []
        ),
        f"- transport: {transports}{order}; WS appends of "
        f"{args.get('ws_chunk_ms', 50)} ms (pcm16, 24 kHz); Twilio: 20 ms `media` of 8 kHz "
        "mu-law (PyAV), events read by a subscriber on `/v1/calls/{callSid}/events`",
        *(
            [f"- reference text ({report['reference']['source']}): {report['reference']['text']}"]
            if report.get("reference")
            else []
        ),
        "",
        *(
            [
                "## Word error rate of the finals (each stream's `completed` transcripts joined, "
                "lowercased, punctuation stripped; errors / reference words, pooled)",
                "",
                markdown_table(WER_HEADERS, wer_rows),
                "",
            ]
            if wer_rows
            else []
        ),
        *(_phone_lines(phone) if phone else []),
        "## End of speech → `completed` by transport (ms; pooled p50 / p95 over streams and "
        "runs, each run's p50 and p95; server CPU % of one core per stream, median of runs)",
        "",
        markdown_table(COMPARE_HEADERS, compare_rows),
        "",
        "## Latency at the client (ms, p50 / p95, pooled over streams and runs)",
        "",
        markdown_table(SUMMARY_HEADERS, summary_rows),
        "",
        "## End of speech → final, split (ms, p50 / p95)",
        "",
        markdown_table(SPLIT_HEADERS, split_rows),
        "",
        "## Runs",
        "",
        markdown_table(RUN_HEADERS, run_rows),
        "",
        NOTES,
    ]
    return "\n".join(lines)


def _phone_lines(phone: list[dict[str, Any]]) -> list[str]:
    """How the server ended the Twilio streams: close codes, ``stop`` -> closed, messages
    sent to Twilio (none expected), subscriber attempts (404 until ``start`` is handled)."""
    codes = Counter(f"{p['stream_close_code']}/{p['subscriber_close_code']}" for p in phone)
    close = summarize(p["close_ms"] for p in phone if p.get("close_ms") is not None)
    return [
        f"Twilio streams: {len(phone)}; close codes stream/subscriber "
        + ", ".join(f"{k} ×{v}" for k, v in codes.items())
        + f"; `stop` → both sockets closed by the server p50 / max {close.p50} / {close.max} "
        f"ms; messages sent to Twilio {sum(p['messages_to_twilio'] for p in phone)}; "
        f"subscribe attempts max {max(p['subscribe_attempts'] for p in phone)}.",
        "",
    ]


def _cell(s: dict[str, Any]) -> str:
    return "—" if s["p50"] is None else f"{s['p50']:.0f} / {s['p95']:.0f}"


def aggregate(phases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per transport and stream count (key ``"<transport> <streams>"``): counts and
    percentiles pooled over runs, each run's p50 / p95 and CPU, the median CPU of the runs."""
    out: dict[str, dict[str, Any]] = {}
    keys = dict.fromkeys((p.get("transport", "webrtc"), p["calls"]) for p in phases)
    for transport, n in sorted(keys, key=lambda k: (k[1], k[0])):
        mine = [p for p in phases if (p.get("transport", "webrtc"), p["calls"]) == (transport, n)]
        records = [r for p in mine for c in p["call_results"] for r in c["records"]]
        cpus = [p["server_cpu_pct_per_call"] for p in mine]
        cpus = [c for c in cpus if c is not None]
        counts = {k: sum(p["counts"][k] for p in mine) for k in mine[0]["counts"]}
        runs = [p["summary"]["end_to_final_ms"] for p in mine]
        out[f"{transport} {n}"] = {
            "transport": transport,
            "calls": n,
            "runs": len(mine),
            "counts": counts,
            "summary": _summaries(records),
            "run_p50": [r["p50"] for r in runs if r["p50"] is not None],
            "run_p95": [r["p95"] for r in runs if r["p95"] is not None],
            "run_cpu_pct_per_call": cpus,
            "server_cpu_pct_per_call": round(float(np.median(cpus)), 1) if cpus else None,
            "wer": pooled_wer([c for p in mine for c in p["call_results"]]),
        }
    return out


# -- main ----------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    restrict_host_addresses([LOOPBACK])  # before any peer exists: loopback candidates only
    load_before = os.getloadavg()[0]
    samples = read_audio(args.audio)
    machine = machine_info()  # the commit the server starts from, not the one at the end
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        port = args.port or free_port()
        config = loopback_config(args.config, port, Path(tmp) / "server.yaml", max(args.calls))
        offline = offline_utterances(samples, config)
        if not offline:
            raise SystemExit(f"{args.audio}: the offline VAD pass found no speech")
        print(f"{args.audio}: {len(offline)} offline utterances", file=sys.stderr)
        server_cm = (
            subprocess_server(Path(tmp) / "server.yaml", port)
            if args.server == "subprocess"
            else inprocess_server(config)
        )
        phases = []
        async with server_cm as server:
            engine = server.engine
            for n in args.calls:
                for repeat in range(1, args.repeat + 1):
                    for transport in transport_order(args.transport, repeat):
                        phases.append(
                            await run_phase(
                                server, config, samples, offline, n, repeat, args, transport
                            )
                        )
                        await asyncio.sleep(args.settle_s)
    return {
        **report_header("latency", args, machine, load_before),
        "server_mode": args.server,
        "engine": engine,
        "config": asdict(config),
        **audio_header(args, samples),
        "offline": [asdict(o) for o in offline],
        "by_calls": aggregate(phases),
        "phases": phases,
    }


def parse_transports(choice: str) -> tuple[str, ...]:
    """``--transport``: one of ``TRANSPORTS``, a comma-separated list of them (run in turn
    within each repetition), or ``both`` (``webrtc,ws``)."""
    if choice == "both":
        return BOTH
    names = tuple(dict.fromkeys(t.strip() for t in choice.split(",") if t.strip()))
    unknown = [t for t in names if t not in TRANSPORTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown transport {', '.join(unknown) or repr(choice)}: use "
            f"{', '.join(TRANSPORTS)}, a comma-separated list of them, or both"
        )
    return names


def transport_order(choice: str, repeat: int) -> tuple[str, ...]:
    """The transports of one repetition: several alternate, the order reversed every other
    repetition, so none always runs on the warmer (or noisier) machine."""
    names = parse_transports(choice)
    return names if repeat % 2 else names[::-1]


def _transport_arg(value: str) -> str:
    parse_transports(value)  # validated here, kept as typed (it is shown in the report)
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="End of speech -> final transcript over 1..N simultaneous aiortc calls "
        "or /v1/realtime WebSocket sessions, all on 127.0.0.1. Prints a markdown table; saves "
        "JSON + markdown.",
        epilog="example: .venv/bin/python bench/latency.py --transport both --calls 1 4 --repeat 2",
    )
    p.add_argument(
        "--audio",
        type=Path,
        default=REPO_ROOT / "tests/data/beckett.wav",
        help="speech file to play (default: tests/data/beckett.wav)",
    )
    p.add_argument(
        "--calls",
        "--streams",
        dest="calls",
        type=int,
        nargs="+",
        default=[1],
        help="simultaneous streams (WebRTC calls or WS sessions), run in turn (default: 1)",
    )
    p.add_argument(
        "--transport",
        type=_transport_arg,
        default="webrtc",
        help="webrtc (default): aiortc calls; ws: /v1/realtime?intent=transcription sockets "
        "sending pcm16 24 kHz appends; twilio: /v1/twilio/media-stream phone streams (8 kHz "
        "mu-law) with a subscriber on /v1/calls/{callSid}/events; a comma-separated list "
        "(webrtc,twilio) or both (= webrtc,ws): they alternate within each repetition",
    )
    p.add_argument(
        "--ws-chunk-ms",
        type=int,
        default=50,
        help="audio per input_audio_buffer.append over the WS (default: 50)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per stream count and transport (default: 1)"
    )
    p.add_argument(
        "--server",
        choices=("subprocess", "inprocess"),
        default="subprocess",
        help="subprocess (default): the server's CPU is measured alone; inprocess: one process",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="base YAML for the server (default: built-in defaults); host, port, ICE host "
        "addresses and ICE servers are forced to loopback; VOXTRAL_RTC_* variables are ignored",
    )
    p.add_argument("--port", type=int, default=0, help="server port (default: 0, a free one)")
    p.add_argument(
        "--stagger-ms",
        type=float,
        default=200.0,
        help="call starts are offset by uniform 0..this (default: 200; 0: all at once)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the stagger (default: 0)")
    p.add_argument(
        "--tail-timeout-s",
        type=float,
        default=0.0,
        help="longest wait for finals after the audio (default: 0 = 20 + 1.5 s x calls x "
        "utterances)",
    )
    p.add_argument(
        "--match-tolerance-ms",
        type=float,
        default=400.0,
        help="largest gap between an event's audio_end_ms and the offline utterance end it is "
        "matched to (default: 400)",
    )
    p.add_argument("--settle-s", type=float, default=1.0, help="pause between runs (default: 1)")
    add_run_args(p)
    args = p.parse_args(argv)
    if not 10 <= args.ws_chunk_ms <= 1000:
        p.error("--ws-chunk-ms must be within 10..1000")
    if not args.audio.is_file():
        p.error(f"no such file: {args.audio}")
    if args.reference is not None and not args.reference.is_file():
        p.error(f"no such file: {args.reference}")
    return check_run_args(p, args)


def main(argv: list[str] | None = None) -> int:
    return run_bench("latency", parse_args(argv), bench, render)


if __name__ == "__main__":
    sys.exit(main())
