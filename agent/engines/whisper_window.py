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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def spoken_text(
    tokens: Sequence[int],
    timestamp_begin: int,
    eot: int,
    decode: Callable[[list[int]], str],
    duration_s: float,
) -> str:
    """The text of a timestamped decode, its segments past the audio or back in time cut.

    ``tokens`` look like ``<|0.00|> words <|1.84|><|1.84|> words <|3.20|>``; a last segment
    may lack its closing timestamp. Everything from the first segment that starts at the
    end of the audio, or before the previous segment ended, is dropped.
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
                return "".join(texts)
            start = at
        else:
            texts.append(decode(words))
            words, start, last_end = [], None, at
    if words and (start is None or start < duration_s - END_MARGIN_S):
        texts.append(decode(words))
    return "".join(texts)
