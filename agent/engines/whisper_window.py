"""Whisper on the utterance's own length instead of its fixed 30-s window (pure, no model).

Whisper's encoder is trained on 30 s of log-mel, so faster-whisper pads every utterance to
3000 frames; on tiny.en that encode is ~90 % of a decode (≈400 ms on one core for a 1-s
phrase, ≈7 ms for its 2 s of frames). CTranslate2 accepts a shorter window, and the
transcript survives with three rules measured on read speech (docs/benchmarks.md):

- never under 10 s: on a 2- or 5-s window tiny.en often says a short phrase again and again
  inside one segment ("No matter. No matter. ..."), which nothing downstream can undo;
- a second of padding after longer audio, so the model hears the utterance end;
- decode *with* timestamps and keep only segments that start inside the audio and move
  forward in time: on a short window the model may otherwise say the utterance twice (it
  "fills" the missing seconds), and a repeated segment starts past the end or jumps back.

A decode may also stop early: on 20-25 s of read sentences tiny.en sometimes closes a
segment, opens the next at the same time stamp and ends there, leaving the last sentence
unsaid. ``Spoken.stopped_at`` says so; the engine then decodes the rest from there, as
faster-whisper's ``transcribe`` seeks to the last time stamp of such a window.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Log-mel frames per second (hop 160 at 16 kHz), Whisper's whole window, and the padding.
FRAMES_PER_S = 100
FULL_WINDOW_FRAMES = 3000
MIN_WINDOW_FRAMES = 1000
PAD_FRAMES = 100
#: Whisper's timestamp tokens step by 20 ms.
TIMESTAMP_S = 0.02
#: A segment starting this close to the end of the audio holds no speech of it.
END_MARGIN_S = 0.1
#: A decode that stopped early is continued only when this much audio is left after it
#: (a VAD's turn ends with ~0.2 s of hangover and the window with a second of padding).
CONTINUE_MIN_S = 0.5
#: faster-whisper's test for a decode stuck in a loop ("fail better, fail better, ..."):
#: its text compresses more than this.
MAX_COMPRESSION_RATIO = 2.4


@dataclass(frozen=True)
class Spoken:
    """The kept text of one decode, and where the model stopped before the audio's end
    (``None`` when it covered the audio, or its text was cut for going astray)."""

    text: str
    stopped_at: float | None = None


def fit_features(
    features: npt.NDArray[np.float32], full_window: bool = False
) -> npt.NDArray[np.float32]:
    """The encoder's input for ``features`` (n_mels × frames): padded with zeros, as
    faster-whisper pads, to the frames plus ``PAD_FRAMES`` and at least
    ``MIN_WINDOW_FRAMES`` (or to the full 30 s), never past 30 s."""
    frames = features.shape[1]
    target = max(frames + PAD_FRAMES, MIN_WINDOW_FRAMES)
    if full_window or target > FULL_WINDOW_FRAMES:
        target = FULL_WINDOW_FRAMES
    if frames >= target:
        return np.ascontiguousarray(features[:, :target])
    return np.ascontiguousarray(np.pad(features, ((0, 0), (0, target - frames))))


def says_words(text: str) -> bool:
    """Does ``text`` hold a word? On a click or a breath Whisper may write punctuation alone
    ("." or "..."): that is no speech, and must not open an item's text or be the context
    of the next turn's final."""
    return any(ch.isalnum() for ch in text)


def repetitive(text: str) -> bool:
    """Is ``text`` a loop rather than speech (faster-whisper's compression-ratio rule)?"""
    data = text.encode()
    return bool(data) and len(data) / len(zlib.compress(data)) > MAX_COMPRESSION_RATIO


def spoken_text(
    tokens: Sequence[int],
    timestamp_begin: int,
    eot: int,
    decode: Callable[[list[int]], str],
    duration_s: float,
) -> Spoken:
    """The text of a timestamped decode, its segments past the audio or back in time cut.

    ``tokens`` look like ``<|0.00|> words <|1.84|><|1.84|> words <|3.20|>``; a last segment
    may lack its closing timestamp. Everything from the first segment that starts at the
    end of the audio, or before the previous segment ended, is dropped. A decode that ends
    on a segment opened with no words in it (``... <|20.00|><|20.00|>`` then the end) stopped
    early at that time when more than ``CONTINUE_MIN_S`` of audio is left.
    """
    texts: list[str] = []
    words: list[int] = []
    start: float | None = None
    last_end = 0.0
    for token in tokens:
        if token == eot:
            break
        if token < timestamp_begin:
            if token < eot:
                words.append(token)
            continue
        at = (token - timestamp_begin) * TIMESTAMP_S
        if start is None:
            if at >= duration_s - END_MARGIN_S or at < last_end - TIMESTAMP_S:
                return Spoken("".join(texts))
            start = at
        else:
            texts.append(decode(words))
            words, start, last_end = [], None, at
    if words and (start is None or start < duration_s - END_MARGIN_S):
        texts.append(decode(words))
    elif texts and start is not None and not words and start < duration_s - CONTINUE_MIN_S:
        return Spoken("".join(texts), stopped_at=start)
    return Spoken("".join(texts))
