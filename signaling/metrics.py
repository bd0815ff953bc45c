"""``GET /metrics``: Prometheus text format, from a registry owned by the app (no globals).

What calls report goes through ``ServerMetrics`` (a ``CallObserver``); what the server and
the engine worker already count is read at scrape time by ``_LiveCollector``. Names:

- ``voxtral_rtc_calls_active``, ``voxtral_rtc_calls_started_total``,
  ``voxtral_rtc_calls_ended_total{reason}``
- ``voxtral_rtc_utterances_total`` (finals sent to the engine)
- ``voxtral_rtc_end_of_speech_to_final_seconds`` (histogram: VAD hangover + decision to
  ``completed`` leaving the server, i.e. ``timings.vad_ms + timings.server_ms``)
- ``voxtral_rtc_engine_batch_seconds{priority}`` (histogram: one ``Engine.transcribe`` call)
- ``voxtral_rtc_engine_queue_depth``, ``voxtral_rtc_engine_lag_seconds``,
  ``voxtral_rtc_engine_degraded``, ``voxtral_rtc_engine_timeouts_total``,
  ``voxtral_rtc_skipped_interims_total``, ``voxtral_rtc_engine_finals_total{outcome}``
- ``voxtral_rtc_audio_lag_seconds`` (histogram: how far behind real time each chunk of call
  audio is when the VAD has processed it; late frames show here first under CPU overload)
- ``voxtral_rtc_events_dropped_total{reason}``
- ``voxtral_rtc_twilio_streams_total``, ``voxtral_rtc_webhook_events_total{outcome}``
  (``delivered``, ``failed``, ``dropped``); a call's SID is in the logs, never a label (one
  series per phone call would grow without bound)
- ``voxtral_rtc_errors_total{source, code}``: ``source`` is ``transcription`` (failed
  finals), ``protocol`` (refused data-channel messages) or ``http`` (JSON error answers)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.engines.worker import EngineWorker, Priority
from agent.observer import CallObserver

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
LAG_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServerMetrics(CallObserver):
    """The app's metrics. ``calls`` and ``worker`` are read at each scrape."""

    def __init__(self, calls: Callable[[], int], worker: Callable[[], EngineWorker | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls_started = Counter(
            "voxtral_rtc_calls_started",
            "Calls and sessions accepted (POST /api/offer, /v1/realtime).",
            registry=r,
        )
        self.calls_ended = Counter(
            "voxtral_rtc_calls_ended", "Calls ended, by reason.", ["reason"], registry=r
        )
        self.utterances = Counter(
            "voxtral_rtc_utterances", "Utterances committed to the engine as finals.", registry=r
        )
        self.end_to_final = Histogram(
            "voxtral_rtc_end_of_speech_to_final_seconds",
            "End of speech to the completed event leaving the server (vad_ms + server_ms).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_batch = Histogram(
            "voxtral_rtc_engine_batch_seconds",
            "Wall time of one engine call (a batch), by priority.",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.audio_lag_seconds = Histogram(
            "voxtral_rtc_audio_lag_seconds",
            "How far behind real time call audio is when the VAD has processed it.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.events_dropped = Counter(
            "voxtral_rtc_events_dropped", "Data-channel events not sent.", ["reason"], registry=r
        )
        self.errors = Counter(
            "voxtral_rtc_errors", "Errors by source and code.", ["source", "code"], registry=r
        )
        self.twilio_streams = Counter(
            "voxtral_rtc_twilio_streams",
            "Twilio media streams accepted (each of their tracks is also a call).",
            registry=r,
        )
        self.webhook_events = Counter(
            "voxtral_rtc_webhook_events",
            "Phone-call completed events for telephony.webhook_url, by outcome.",
            ["outcome"],
            registry=r,
        )
        r.register(_LiveCollector(calls, worker))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_batch(self, priority: Priority, size: int, seconds: float) -> None:
        self.engine_batch.labels(priority.name.lower()).observe(seconds)

    def webhook_outcome(self, outcome: str) -> None:
        self.webhook_events.labels(outcome).inc()

    def http_error(self, code: str) -> None:
        self.errors.labels("http", code).inc()

    # -- CallObserver ----------------------------------------------------------------------

    def call_ended(self, reason: str) -> None:
        self.calls_ended.labels(reason).inc()

    def utterance_committed(self) -> None:
        self.utterances.inc()

    def final_completed(self, end_of_speech_to_final_s: float) -> None:
        self.end_to_final.observe(end_of_speech_to_final_s)

    def transcription_failed(self, code: str) -> None:
        self.errors.labels("transcription", code).inc()

    def protocol_error(self, code: str) -> None:
        self.errors.labels("protocol", code).inc()

    def event_dropped(self, reason: str) -> None:
        self.events_dropped.labels(reason).inc()

    def audio_lag(self, seconds: float) -> None:
        self.audio_lag_seconds.observe(seconds)


class _LiveCollector(Collector):
    """Figures the server and the worker keep anyway, read when Prometheus scrapes."""

    def __init__(self, calls: Callable[[], int], worker: Callable[[], EngineWorker | None]) -> None:
        self._calls = calls
        self._worker = worker

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: its names are not registered up front

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("voxtral_rtc_calls_active", "Calls in progress.", self._calls())
        w = self._worker()
        if w is None:
            return
        yield GaugeMetricFamily(
            "voxtral_rtc_engine_queue_depth", "Utterances waiting for the engine.", w.queue_depth
        )
        yield GaugeMetricFamily(
            "voxtral_rtc_engine_lag_seconds",
            "Wait of the oldest final still queued for the engine.",
            w.lag_ms() / 1000,
        )
        yield GaugeMetricFamily(
            "voxtral_rtc_engine_degraded",
            "1 while an engine call that passed the watchdog has not returned, or while no "
            "remote transcription server is in service.",
            int(w.degraded),
        )
        yield CounterMetricFamily(
            "voxtral_rtc_engine_timeouts",
            "Engine calls stopped by the watchdog, or by engine.remote.timeout_s.",
            w.timeouts,
        )
        yield CounterMetricFamily(
            "voxtral_rtc_skipped_interims",
            "Interim decodes skipped because the engine was busy or behind.",
            w.skipped_interims,
        )
        finals = CounterMetricFamily(
            "voxtral_rtc_engine_finals", "Finals transcribed, by outcome.", labels=["outcome"]
        )
        finals.add_metric(["completed"], w.completed)
        finals.add_metric(["failed"], w.failed)
        yield finals
