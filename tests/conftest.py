"""Shared fixtures: test audio, configurations, the embedded engine, a running server."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from agent.config import Config, load_config
from agent.engines.base import Engine

DATA = Path(__file__).parent / "data"
BECKETT = DATA / "beckett.wav"
BECKETT_PHRASES = [
    "ever tried",
    "ever failed",
    "no matter",
    "try again",
    "fail again",
    "fail better",
]
#: Silero speech regions of beckett.wav in seconds (../shared/audio/README.md).
BECKETT_REGIONS = [
    (0.35, 1.22),
    (1.89, 2.82),
    (3.52, 4.19),
    (4.90, 5.60),
    (6.66, 7.39),
    (8.16, 8.90),
]


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


@pytest.fixture(scope="session")
def beckett_audio() -> npt.NDArray[np.float32]:
    from signaling.client import read_audio

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
