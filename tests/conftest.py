"""Shared fixtures: test audio, configurations, the embedded engine, a running server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from agent.config import Config, load_config
from agent.engines.base import Engine
from voxtral_rtc_client.text import normalise

__all__ = ["BECKETT", "BECKETT_PHRASES", "BECKETT_REGIONS", "normalise"]

DATA = Path(__file__).parent / "data"
BECKETT = DATA / "beckett.wav"
_BECKETT_FACTS = json.loads((DATA / "beckett.json").read_text())  # the benchmarks read it too
BECKETT_PHRASES: list[str] = _BECKETT_FACTS["phrases"]
#: Silero speech regions of beckett.wav in seconds (../shared/audio/README.md).
BECKETT_REGIONS: list[tuple[float, float]] = [(a, b) for a, b in _BECKETT_FACTS["regions"]]


@pytest.fixture(scope="session")
def beckett_audio() -> npt.NDArray[np.float32]:
    from agent.audio_file import read_audio

    return read_audio(BECKETT)


def make_config(**env: str) -> Config:
    """Defaults + loopback-only media + a free port, plus ``SECTION__KEY=value`` overrides."""
    base = {
        "VOXTRAL_RTC_SERVER__HOST": "127.0.0.1",
        "VOXTRAL_RTC_SERVER__PORT": "0",
        "VOXTRAL_RTC_WEBRTC__HOST_ADDRESSES": "[127.0.0.1]",
    }
    base.update({f"VOXTRAL_RTC_{k.upper()}": v for k, v in env.items()})
    return load_config(None, base)


@pytest.fixture(scope="session")
def embedded_engine() -> Engine:
    from agent.engines.embedded import EmbeddedWhisperEngine

    return EmbeddedWhisperEngine(make_config().engine)


@pytest.fixture
def config_factory() -> Callable[..., Config]:
    return make_config


@pytest.fixture
async def server(embedded_engine: Engine) -> AsyncIterator[object]:
    from signaling.app import start_server

    running = await start_server(make_config(), engine=embedded_engine)
    try:
        yield running
    finally:
        await running.stop()
