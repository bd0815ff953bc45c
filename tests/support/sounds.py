"""Sounds that are not speech, for what a VAD lets through."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def clicks(rate: int = 16_000) -> npt.NDArray[np.float32]:
    """300 ms of clicks: twelve 2 kHz ticks, each dying out within 25 ms. The energy VAD
    takes them for speech (as Silero takes a real mouth click or breath); Whisper hears no
    word in them, so their item completes with an empty transcript."""
    t = np.arange(int(0.025 * rate)) / rate
    tick = 0.8 * np.exp(-t / 0.004) * np.sin(2 * np.pi * 2000 * t)
    return np.tile(tick, 12).astype(np.float32)
