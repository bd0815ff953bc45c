"""Configuration: ``config.yaml`` plus environment overrides, validated into frozen objects.

This is the only module that reads YAML or the environment. Every other component receives
the typed section it needs. Unknown keys and bad values stop start-up with a message that
names the key (``vad.threshold: must be <= 1, got 2``), never a stack trace deep in a stage.

Environment overrides follow ``VOXTRAL_RTC_<SECTION>__<KEY>=value``; the value is parsed as
YAML so ``0.4``, ``true`` and ``[127.0.0.1]`` get their natural types.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import types
import typing
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agent.errors import ConfigError

ENV_PREFIX = "VOXTRAL_RTC_"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Folder holding the browser client; empty means the ``web/`` folder of the checkout.
    web_dir: str = ""
    #: Largest request body accepted by the signalling routes, in bytes.
    max_body_bytes: int = 262_144
    #: Bearer tokens accepted on ``/api/*``, ``/v1/*`` and ``/metrics``; empty = no auth.
    auth_tokens: tuple[str, ...] = ()
    #: Origins whose pages may call ``/api/*`` and ``/v1/*`` from a browser (CORS); ``*`` = any.
    cors_origins: tuple[str, ...] = ()
    #: On SIGTERM: how long open calls get to finish their utterances before they are closed.
    shutdown_grace_s: float = 10.0
    #: PEM certificate chain and private key: both set serves the page, the API and the
    #: WebSockets over TLS (https, wss); both empty serves plain http (behind a TLS proxy).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: Whose ``X-Voxtral-Priority`` (a gateway's ``final``/``interim``) ``/v1/audio/
    #: transcriptions`` queues by: ``authenticated`` callers only (``auth_tokens`` set: every
    #: caller holds a token), ``any`` caller (a node only gateways can reach), or ``none``.
    #: Unheeded, a request is a recorded file's piece. See docs/scaling.md.
    priority_hints: Literal["none", "authenticated", "any"] = "authenticated"

    def validate(self) -> None:
        _check(
            0 <= self.port <= 65535,
            "server.port",
            f"must be 0..65535 (0: any free port), got {self.port}",
        )
        _check(self.max_body_bytes >= 1024, "server.max_body_bytes", "must be >= 1024")
        for token in self.auth_tokens:
            _check(
                len(token) >= 16 and token.isprintable() and not any(c.isspace() for c in token),
                "server.auth_tokens",
                "each token must be at least 16 printable characters without spaces "
                "(e.g. openssl rand -hex 24)",
            )
        for origin in self.cors_origins:
            _check(
                origin == "*"
                or (
                    origin.startswith(("http://", "https://"))
                    and "/" not in origin.split("://", 1)[1]
                    and len(origin.split("://", 1)[1]) > 0
                ),
                "server.cors_origins",
                f"must be '*' or an origin like https://app.example.com (no path), got {origin!r}",
            )
        _check(0 <= self.shutdown_grace_s <= 600, "server.shutdown_grace_s", "must be 0..600")
        _check(
            bool(self.tls_cert_file) == bool(self.tls_key_file),
            "server.tls_cert_file" if not self.tls_cert_file else "server.tls_key_file",
            "server.tls_cert_file and server.tls_key_file go together (both set, or both empty)",
        )

    @property
    def web_path(self) -> Path:
        return Path(self.web_dir) if self.web_dir else REPO_ROOT / "web"


@dataclass(frozen=True)
class IceServer:
    urls: tuple[str, ...] = ()
    username: str = ""
    credential: str = ""

    def validate(self) -> None:
        _check(bool(self.urls), "webrtc.ice_servers.urls", "must name at least one URL")
        for url in self.urls:
            _check(
                url.split(":", 1)[0] in ("stun", "stuns", "turn", "turns"),
                "webrtc.ice_servers.urls",
                f"must start with stun:, stuns:, turn: or turns:, got {url!r}",
            )


@dataclass(frozen=True)
class WebRTCConfig:
    #: IP addresses the server gathers ICE host candidates on; empty means every interface.
    host_addresses: tuple[str, ...] = ()
    #: ``[first, last]``: every UDP port the server's ICE candidates use lies in this range
    #: (inclusive), so a firewall rule can name it; empty = any port the system picks.
    udp_ports: tuple[int, ...] = ()
    #: The address callers reach this server at through a 1:1 NAT (a cloud VM's public IP):
    #: announced in the host candidates instead of the bound address, same port.
    public_address: str = ""
    #: STUN/TURN servers handed to the page through ``/api/config``; the server itself uses
    #: their STUN URLs (its TURN relay would be a port outside ``udp_ports``, and a caller's
    #: relay reaches the server's own candidates).
    ice_servers: tuple[IceServer, ...] = ()
    #: coturn's ``static-auth-secret`` (``use-auth-secret``): TURN entries of ``ice_servers``
    #: without a username get short-lived credentials minted for each ``/api/config``.
    #: Best set from the environment: ``VOXTRAL_RTC_WEBRTC__TURN_SECRET``.
    turn_secret: str = ""
    #: How long such credentials stay valid; coturn checks them on every allocation refresh,
    #: so this is also the longest a relayed call lasts.
    turn_ttl_s: int = 3600
    #: Label of the data channel carrying the OpenAI Realtime events.
    data_channel: str = "oai-events"
    #: Newer audio frames a received frame waits for before decoding: 0 hands each frame on
    #: as soon as it is next in sequence; aiortc's own default is 4 (+80 ms of delay).
    jitter_prefetch_frames: int = 0

    def validate(self) -> None:
        for addr in self.host_addresses:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ConfigError(f"webrtc.host_addresses: {addr!r} is not an IP address") from None
        _check(
            len(self.udp_ports) in (0, 2)
            and all(1024 <= p <= 65535 for p in self.udp_ports)
            and (not self.udp_ports or self.udp_ports[0] <= self.udp_ports[1]),
            "webrtc.udp_ports",
            f"must be empty or [first, last] with 1024 <= first <= last <= 65535, got "
            f"{list(self.udp_ports)}",
        )
        if self.public_address:
            try:
                ipaddress.ip_address(self.public_address)
            except ValueError:
                raise ConfigError(
                    f"webrtc.public_address: {self.public_address!r} is not an IP address"
                ) from None
        for server in self.ice_servers:
            server.validate()
            turn = any(url.startswith(("turn:", "turns:")) for url in server.urls)
            if turn and self.turn_secret:
                _check(
                    not server.username and not server.credential,
                    "webrtc.ice_servers",
                    "a TURN server gets per-call credentials from webrtc.turn_secret: "
                    "leave its username and credential empty",
                )
            elif turn:
                _check(
                    bool(server.username and server.credential),
                    "webrtc.ice_servers",
                    "a TURN server needs a username and credential, or webrtc.turn_secret",
                )
        _check(
            not self.turn_secret
            or any(u.startswith(("turn:", "turns:")) for s in self.ice_servers for u in s.urls),
            "webrtc.turn_secret",
            "is set but webrtc.ice_servers names no turn: or turns: URL",
        )
        _check(60 <= self.turn_ttl_s <= 7 * 86400, "webrtc.turn_ttl_s", "must be 60..604800")
        _check(
            0 <= self.jitter_prefetch_frames <= 15, "webrtc.jitter_prefetch_frames", "must be 0..15"
        )


@dataclass(frozen=True)
class AudioConfig:
    #: A call with no audio frame for this long is closed (its open utterance is flushed first).
    idle_timeout_s: float = 10.0

    def validate(self) -> None:
        _check(self.idle_timeout_s > 0, "audio.idle_timeout_s", "must be > 0")


@dataclass(frozen=True)
class VadConfig:
    kind: Literal["silero", "energy"] = "silero"
    #: Speech probability at which speech starts (Silero); ends below ``threshold - 0.15``.
    threshold: float = 0.5
    #: RMS level treated as speech by the energy VAD (float samples in [-1, 1]).
    energy_threshold: float = 0.01
    #: Path of a Silero ONNX file; empty means the copy bundled with faster-whisper.
    model_path: str = ""

    def validate(self) -> None:
        _check(0 < self.threshold < 1, "vad.threshold", f"must be in (0, 1), got {self.threshold}")
        _check(0 < self.energy_threshold < 1, "vad.energy_threshold", "must be in (0, 1)")
        if self.model_path:
            _check(Path(self.model_path).is_file(), "vad.model_path", "file does not exist")


@dataclass(frozen=True)
class SegmenterConfig:
    min_speech_ms: int = 100
    min_silence_ms: int = 200
    prefix_padding_ms: int = 300
    max_utterance_s: float = 30.0

    def validate(self) -> None:
        _check(self.min_speech_ms >= 0, "segmenter.min_speech_ms", "must be >= 0")
        _check(self.min_silence_ms >= 32, "segmenter.min_silence_ms", "must be >= 32")
        _check(self.prefix_padding_ms >= 0, "segmenter.prefix_padding_ms", "must be >= 0")
        _check(
            1.0 <= self.max_utterance_s <= 30.0,
            "segmenter.max_utterance_s",
            f"must be in [1, 30] (the engines' window), got {self.max_utterance_s}",
        )


@dataclass(frozen=True)
class RemoteEngineConfig:
    """``engine.kind: remote``: OpenAI-compatible ``/audio/transcriptions`` servers (vLLM
    serving Voxtral, or another voxtral-rtc) that transcribe this gateway's utterances."""

    #: Base URL(s) ending in ``/v1`` (``http://10.0.0.5:8000/v1``); a list spreads requests
    #: over several servers, each to the one with the fewest requests in flight.
    base_url: tuple[str, ...] = ()
    #: Sent as ``Authorization: Bearer``; empty = none. Best set from the environment:
    #: ``VOXTRAL_RTC_ENGINE__REMOTE__API_KEY``.
    api_key: str = ""
    #: The ``model`` form field; empty = not sent (the server's only model).
    model: str = ""
    #: One utterance's whole budget, retries included; past it: ``engine_timeout``.
    timeout_s: float = 10.0
    #: Requests in flight at once per server, at most (a voxtral-rtc node that says it runs
    #: fewer, ``X-Voxtral-Capacity``, gets fewer); more wait in the gateway's engine queue.
    max_concurrency: int = 16
    #: Further tries of a request that met a connection error or a 5xx, backing off.
    retries: int = 2

    def validate(self, required: bool = False) -> None:
        if required:
            _check(
                bool(self.base_url),
                "engine.remote.base_url",
                "must name at least one server when engine.kind is remote",
            )
        for url in self.base_url:
            rest = url.split("://", 1)[-1]
            _check(
                url.startswith(("http://", "https://"))
                and bool(rest.split("/", 1)[0])
                and not any(c in rest for c in "?#@ "),
                "engine.remote.base_url",
                f"must be http(s) URLs like http://10.0.0.5:8000/v1, got {url!r}",
            )
        _check(
            self.api_key == "" or (self.api_key.isprintable() and " " not in self.api_key),
            "engine.remote.api_key",
            "must be printable, without spaces",
        )
        _check(0 < self.timeout_s <= 600, "engine.remote.timeout_s", "must be in (0, 600]")
        _check(
            1 <= self.max_concurrency <= 1024, "engine.remote.max_concurrency", "must be 1..1024"
        )
        _check(0 <= self.retries <= 10, "engine.remote.retries", "must be 0..10")


@dataclass(frozen=True)
class EngineConfig:
    kind: Literal["embedded", "voxtral", "voxtral_realtime", "remote"] = "embedded"
    #: Model folder or hub id; empty means the engine's default.
    model: str = ""
    #: ``auto`` picks CUDA when present.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Language code, or empty for the model's default / detection.
    language: str = ""
    beam_size: int = 5
    temperature: float = 0.0
    #: Threads the embedded engine's CTranslate2 backend uses.
    cpu_threads: int = 1
    #: Embedded engine: encode each utterance on its length plus 1 s (``fit``) or on
    #: Whisper's fixed 30 s (``full``, faster-whisper's way: ~6x the CPU per decode).
    encoder_window: Literal["fit", "full"] = "fit"
    #: Most utterances decoded in one forward, and longest wait to fill a batch.
    max_batch: int = 8
    max_wait_ms: int = 5
    #: Utterances waiting for the engine beyond this are failed at once (``queue_full``).
    max_queue: int = 256
    #: Re-transcribe an open utterance this often for live deltas; 0 turns interims off.
    interim_interval_ms: int = 300
    #: ...but one item's interims take at most this share of the time: after a hypothesis
    #: that took d s the next waits d / share s (the first two excepted); 0 = no bound.
    interim_share: float = 0.05
    #: Start the final decode when silence begins, before the hangover confirms the end.
    speculative_final: bool = True
    #: ... once the silence has lasted this long: the short dips between words then cost no
    #: decode (a decode cannot be stopped once the engine has it), and the final still
    #: starts well inside the hangover (``segmenter.min_silence_ms``).
    speculative_hold_ms: int = 64
    #: Decode a live final behind the call's previous utterance (its audio first, its final
    #: text forced, the finals before it as the prompt): the embedded engine mishears fewer
    #: short turns (read8 turn by turn: 12.7 -> 9.1 % WER with no prompt) for about a third
    #: more CPU per final. Other engines ignore it.
    final_context: bool = True
    #: Engine calls run in parallel (each its own thread). The embedded CPU engine keeps one
    #: model replica per lane so a final never waits behind an interim; GPU engines batch
    #: instead and use one lane whatever this says.
    lanes: int = 2
    #: An engine call running longer than this fails its utterances (``engine_timeout``) and
    #: its thread is abandoned for a fresh one.
    watchdog_s: float = 30.0
    #: ``kind: voxtral_realtime`` only: the model's delay (text for audio at t comes once
    #: t + delay is heard; sessions may set their own), and the most streams open at once.
    delay_ms: int = 480
    max_streams: int = 64
    #: ``kind: voxtral_realtime`` only: compile the step once per batch-size bucket (powers
    #: of two up to ``max_streams``) at start-up. CPU: inductor, tested; CUDA: CUDA graphs,
    #: not yet run on a GPU. (``kind: voxtral`` compiles its decode step on CUDA by itself.)
    compile: bool = False
    #: ``kind: remote`` only: where utterances are sent.
    remote: RemoteEngineConfig = field(default_factory=RemoteEngineConfig)

    def validate(self) -> None:
        self.remote.validate(required=self.kind == "remote")
        _check(1 <= self.beam_size <= 16, "engine.beam_size", "must be 1..16")
        _check(self.temperature >= 0, "engine.temperature", "must be >= 0")
        _check(self.cpu_threads >= 1, "engine.cpu_threads", "must be >= 1")
        _check(1 <= self.max_batch <= 256, "engine.max_batch", "must be 1..256")
        _check(0 <= self.max_wait_ms <= 1000, "engine.max_wait_ms", "must be 0..1000")
        _check(self.max_queue >= 1, "engine.max_queue", "must be >= 1")
        _check(
            self.interim_interval_ms == 0 or 100 <= self.interim_interval_ms <= 10_000,
            "engine.interim_interval_ms",
            "must be 0 (off) or 100..10000",
        )
        _check(
            0 <= self.speculative_hold_ms <= 2000,
            "engine.speculative_hold_ms",
            "must be 0..2000",
        )
        _check(0 <= self.interim_share <= 1, "engine.interim_share", "must be 0..1")
        _check(1 <= self.lanes <= 16, "engine.lanes", "must be 1..16")
        _check(0 < self.watchdog_s <= 3600, "engine.watchdog_s", "must be in (0, 3600]")
        _check(
            self.delay_ms % 80 == 0 and 80 <= self.delay_ms <= 2400,
            "engine.delay_ms",
            "must be a multiple of 80 in 80..2400",
        )
        _check(1 <= self.max_streams <= 4096, "engine.max_streams", "must be 1..4096")


@dataclass(frozen=True)
class LimitsConfig:
    #: Events waiting for the data channel to open; older ones are dropped past this.
    event_queue: int = 256
    max_calls: int = 64
    #: ``POST /api/offer`` per client IP and minute (token bucket, bursts up to this); 0 = off.
    offers_per_minute_per_ip: int = 60
    #: ``PATCH /api/offer`` (trickle ICE) per client IP and minute (token bucket); 0 = off.
    patches_per_minute_per_ip: int = 120
    #: Trickled ICE candidates one call accepts over its life: each is an address the
    #: server sends STUN checks to, so an unbounded list makes it a reflector.
    candidates_per_call: int = 32
    #: Longest call in seconds; the call then ends itself (open utterance flushed); 0 = none.
    max_call_s: float = 3600.0
    #: Data-channel send buffer beyond which deltas and interims are dropped (finals never).
    channel_buffer_bytes: int = 262_144
    #: What a session's inbound queue may hold (audio and messages not yet handled): a
    #: media track then waits; a WebSocket client pushing audio faster than it can be
    #: handled gets an ``error`` and is closed. 4 MiB is about 60 s of 24 kHz pcm16 in base64.
    input_buffer_bytes: int = 4_194_304
    #: Largest ``/v1/realtime`` WebSocket message (an append of about 8 s of 24 kHz pcm16).
    ws_max_message_bytes: int = 1_048_576
    #: Largest audio file accepted for file transcription (upload, base64 or URL), in bytes.
    max_upload_bytes: int = 104_857_600
    #: Longest decoded audio accepted for file transcription, in seconds (16 kHz mono
    #: float32 costs 230 MB per hour of audio while it is transcribed).
    max_audio_s: float = 7200.0
    #: File transcriptions running at once; more get 503 + Retry-After.
    max_file_jobs: int = 2
    #: Longest one file's decode may take (its own process, killed then): a 2-hour Opus
    #: file decodes in about a minute on 2 busy cores; a file that takes longer is a trick.
    decode_timeout_s: float = 300.0
    #: An upload's body must arrive at this average pace once ``upload_grace_s`` has
    #: passed, or it gets 408: a stalled upload cannot hold a connection and its memory.
    upload_min_bytes_per_s: int = 32_768
    upload_grace_s: float = 10.0
    #: Whole-fetch deadline for ``file_url`` downloads (all redirects included).
    url_timeout_s: float = 30.0
    #: Redirects followed for ``file_url``; each hop's scheme and addresses are re-checked.
    url_max_redirects: int = 5
    #: Let ``file_url`` reach private, loopback and link-local addresses (SSRF guard off).
    allow_private_urls: bool = False

    def validate(self) -> None:
        _check(self.event_queue >= 8, "limits.event_queue", "must be >= 8")
        _check(self.max_calls >= 1, "limits.max_calls", "must be >= 1")
        _check(
            self.offers_per_minute_per_ip >= 0,
            "limits.offers_per_minute_per_ip",
            "must be >= 0 (0: no limit)",
        )
        _check(
            self.patches_per_minute_per_ip >= 0,
            "limits.patches_per_minute_per_ip",
            "must be >= 0 (0: no limit)",
        )
        _check(self.candidates_per_call >= 1, "limits.candidates_per_call", "must be >= 1")
        _check(
            self.max_call_s == 0 or self.max_call_s >= 1,
            "limits.max_call_s",
            "must be 0 (no limit) or >= 1",
        )
        _check(self.channel_buffer_bytes >= 1024, "limits.channel_buffer_bytes", "must be >= 1024")
        _check(self.input_buffer_bytes >= 65_536, "limits.input_buffer_bytes", "must be >= 65536")
        _check(
            self.ws_max_message_bytes >= 65_536, "limits.ws_max_message_bytes", "must be >= 65536"
        )
        _check(self.max_upload_bytes >= 1024, "limits.max_upload_bytes", "must be >= 1024")
        _check(self.max_audio_s >= 1, "limits.max_audio_s", "must be >= 1")
        _check(self.max_file_jobs >= 1, "limits.max_file_jobs", "must be >= 1")
        _check(self.decode_timeout_s > 0, "limits.decode_timeout_s", "must be > 0")
        _check(
            self.upload_min_bytes_per_s >= 1024, "limits.upload_min_bytes_per_s", "must be >= 1024"
        )
        _check(self.upload_grace_s > 0, "limits.upload_grace_s", "must be > 0")
        _check(self.url_timeout_s > 0, "limits.url_timeout_s", "must be > 0")
        _check(0 <= self.url_max_redirects <= 20, "limits.url_max_redirects", "must be 0..20")


@dataclass(frozen=True)
class TelephonyConfig:
    """Phone calls through Twilio Media Streams (``/v1/twilio/*``, ``/v1/calls/*``)."""

    #: The Twilio account's Auth Token: when set, the media stream's upgrade and the TwiML
    #: webhook must carry a valid ``X-Twilio-Signature`` (else 403). Best set from the
    #: environment: ``VOXTRAL_RTC_TELEPHONY__TWILIO_AUTH_TOKEN``.
    twilio_auth_token: str = ""
    #: The server's address as Twilio reaches it (``https://voice.example.com``), when a
    #: proxy stands between them: the TwiML's stream URL and the URLs signatures are
    #: checked against. Empty: the request's own ``Host``.
    public_url: str = ""
    #: TwiML that ``POST /v1/twilio/voice`` answers after its ``<Start><Stream>``: what the
    #: call does while it is transcribed (``<Dial>+15551234567</Dial>``, a ``<Say>``...).
    twiml_after_start: str = '<Pause length="60"/>'
    #: A ``media`` before ``start``, or no ``start`` within this many seconds, ends a stream.
    start_timeout_s: float = 5.0
    #: Each ``completed`` of a phone call is POSTed here as JSON; empty = no webhook.
    webhook_url: str = ""
    #: Completed events waiting for the webhook; the oldest is dropped beyond this.
    webhook_queue: int = 1000
    #: Further tries of a POST that fails (connection error, 5xx, 429), backing off.
    webhook_retries: int = 3
    #: Subscribers (``GET /v1/calls/{callSid}/events``) one call accepts at once.
    max_subscribers: int = 8

    def validate(self) -> None:
        if self.public_url:
            rest = self.public_url.split("://", 1)[-1]
            _check(
                self.public_url.startswith(("http://", "https://"))
                and bool(rest)
                and not any(c in rest for c in "/?#@"),
                "telephony.public_url",
                f"must be an origin like https://voice.example.com (no path), got "
                f"{self.public_url!r}",
            )
        if self.webhook_url:
            _check(
                self.webhook_url.startswith(("http://", "https://")),
                "telephony.webhook_url",
                f"must be an http:// or https:// URL, got {self.webhook_url!r}",
            )
        _check(_is_twiml(self.twiml_after_start), "telephony.twiml_after_start", "must be TwiML")
        _check(0 < self.start_timeout_s <= 60, "telephony.start_timeout_s", "must be in (0, 60]")
        _check(self.webhook_queue >= 1, "telephony.webhook_queue", "must be >= 1")
        _check(0 <= self.webhook_retries <= 10, "telephony.webhook_retries", "must be 0..10")
        _check(1 <= self.max_subscribers <= 256, "telephony.max_subscribers", "must be 1..256")


def _is_twiml(fragment: str) -> bool:
    """Whether ``fragment`` is well-formed XML inside ``<Response>`` (verbs, or nothing)."""
    try:
        ET.fromstring(f"<Response>{fragment}</Response>")
    except ET.ParseError:
        return False
    return True


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    webrtc: WebRTCConfig = field(default_factory=WebRTCConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    telephony: TelephonyConfig = field(default_factory=TelephonyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with some keys of one section changed (validated like a file would be)."""
        updated = dataclasses.replace(getattr(self, section), **values)
        cfg = dataclasses.replace(self, **{section: updated})
        cfg.validate()
        return cfg


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or the defaults), apply environment overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded or {}
    _apply_env(raw, os.environ if environ is None else environ)
    cfg = _build(Config, raw, "")
    assert isinstance(cfg, Config)
    cfg.validate()
    return cfg


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, sep, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if not sep or not key:
            raise ConfigError(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
        # A nested section's key: VOXTRAL_RTC_ENGINE__REMOTE__API_KEY -> engine.remote.api_key.
        *parents, key = key.split("__")
        target = raw.setdefault(section, {})
        where = section
        for parent in parents:
            if not isinstance(target, dict):
                break
            target = target.setdefault(parent, {})
            where = f"{where}.{parent}"
        if not isinstance(target, dict) or not key:
            raise ConfigError(f"{where}: must be a mapping")
        try:
            target[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            target[key] = value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            name = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{name}: unknown key (known: {', '.join(sorted(known))})")
    values = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else key
        values[key] = _coerce(hints[key], value, name)
    return cls(**values)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _build(hint, value if value is not None else {}, name)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(
                f"{name}: must be one of {', '.join(map(str, allowed))}, got {value!r}"
            )
        return value
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if value is None:
            return ()
        if isinstance(value, str) and item_hint is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: must be a list, got {type(value).__name__}")
        return tuple(_coerce(item_hint, v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(f"{name}: unsupported type")  # pragma: no cover - not used
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{name}: must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{name}: unsupported type {hint!r}")  # pragma: no cover


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")
