"""Engines behind one interface (``Engine.transcribe``); one module per engine."""

from __future__ import annotations

from agent.config import EngineConfig
from agent.engines.base import Engine, EngineRequest, EngineResult

__all__ = ["Engine", "EngineRequest", "EngineResult", "create_engine"]


def create_engine(config: EngineConfig) -> Engine:
    """Build the configured engine. Blocking (loads weights): call it off the event loop."""
    if config.kind == "embedded":
        from agent.engines.embedded import EmbeddedWhisperEngine

        return EmbeddedWhisperEngine(config)
    if config.kind == "voxtral":
        from agent.engines.voxtral import VoxtralEngine

        return VoxtralEngine(config)
    raise ValueError(f"unknown engine kind {config.kind!r}")  # pragma: no cover - validated
