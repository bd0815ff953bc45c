"""Engines behind three interfaces (``Engine.transcribe`` on threads, ``AsyncEngine.transcribe_one``
on the event loop, ``StreamingEngine.open_stream`` for streams); one module per engine."""

from __future__ import annotations

from agent.config import EngineConfig
from agent.engines.base import AsyncEngine, Engine, EngineRequest, EngineResult

__all__ = ["AsyncEngine", "Engine", "EngineRequest", "EngineResult", "create_engine"]


def create_engine(config: EngineConfig) -> Engine | AsyncEngine:
    """Build the configured engine. Blocking (loads weights): call it off the event loop."""
    if config.kind == "embedded":
        from agent.engines.embedded import EmbeddedWhisperEngine

        return EmbeddedWhisperEngine(config)
    if config.kind == "voxtral":
        from agent.engines.voxtral import VoxtralEngine

        return VoxtralEngine(config)
    if config.kind == "voxtral_realtime":
        from agent.engines.voxtral_realtime import VoxtralRealtimeEngine

        return VoxtralRealtimeEngine(config)
    if config.kind == "remote":
        from agent.engines.remote import RemoteEngine

        return RemoteEngine(config)  # no I/O until RemoteEngine.start, on the loop
    raise ValueError(f"unknown engine kind {config.kind!r}")  # pragma: no cover - validated
