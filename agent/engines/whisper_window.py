"""Whisper on the utterance's own length instead of its fixed 30-s window (pure, no model).

Whisper's encoder is trained on 30 s of log-mel, so faster-whisper pads every utterance to
3000 frames; on tiny.en that encode is ~90 % of a decode (≈400 ms on one core for a 1-s
phrase, ≈7 ms for its 2 s of frames). CTranslate2 accepts a shorter window, and the
transcript survives with three rules measured on read speech (docs/benchmarks.md):

- never under 10 s: on a 2- or 5-s window tiny.en often says a short phrase again and again
  inside one segment ("No matter. No matter. ..."), which nothing downstream can undo;
- a second of padding after longer audio, so the model hears the utterance end; for a
  final, padding at the level of digital silence (``silence_level``), as the model was
  trained, rather than faster-whisper's zeros: turn by turn that misheard fewer words,
  most where a client's resampler had already cut the top of the band;
- decode *with* timestamps and keep only segments that start inside the audio and move
  forward in time: on a short window the model may otherwise say the utterance twice (it
  "fills" the missing seconds), and a repeated segment starts past the end or jumps back.

A decode may also stop early: on 20-25 s of read sentences tiny.en sometimes closes a
segment, opens the next at the same time stamp and ends there, leaving the last sentence
unsaid. ``Spoken.stopped_at`` says so; the engine then decodes the rest from there, as
faster-whisper's ``transcribe`` seeks to the last time stamp of such a window.
"""

from __future__ import annotations

import re
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
#: A decode whose last segment closed this long before the end of the audio left speech
#: unsaid: tiny.en may end a 30-s piece where a second voice begins (long3 through Opus:
#: two sentences of 10 s dropped, docs/benchmarks.md). It is continued from that close.
UNSAID_MIN_S = 2.0
#: A segment whose last this-many words or more are the words just before them said again
#: ends in a repeat (``without_repeated_end``) ...
REPEAT_MIN_WORDS = 3
#: ... which is cut when the segment, with it, would say more words a second than this:
#: read speech is 2.5-3.5, and a passage spoken twice must keep both.
MAX_WORDS_PER_S = 4.0
#: A decode of this much audio or more that says fewer words a second than the next may
#: have ended before the speech did (``says_too_little``) ...
TERSE_MIN_S = 6.0
#: ... read speech is 2.5-3.5 words a second over a turn the VAD cut, hangover included
#: (long3's turns of 6-22 s: 2.7-3.5; the one that lost two sentences: 2.1).
TERSE_WORDS_PER_S = 2.5
_WORD = re.compile(r"[\w']+")
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
    features: npt.NDArray[np.float32], full_window: bool = False, silence: bool = False
) -> npt.NDArray[np.float32]:
    """The encoder's input for ``features`` (n_mels × frames): padded to the frames plus
    ``PAD_FRAMES`` and at least ``MIN_WINDOW_FRAMES`` (or to the full 30 s), never past 30 s;
    padded with zeros, as faster-whisper pads, or with ``silence``: the level digital
    silence has in these features (``silence_level``)."""
    frames = features.shape[1]
    target = max(frames + PAD_FRAMES, MIN_WINDOW_FRAMES)
    if full_window or target > FULL_WINDOW_FRAMES:
        target = FULL_WINDOW_FRAMES
    if frames >= target:
        return np.ascontiguousarray(features[:, :target])
    level = silence_level(features) if silence else 0.0
    padding = ((0, 0), (0, target - frames))
    return np.ascontiguousarray(np.pad(features, padding, constant_values=level))


def silence_level(features: npt.NDArray[np.float32]) -> float:
    """What zeros after the audio would be in ``features``: Whisper's log-mel floors every
    value at 8 (log10) under the clip's maximum, then maps x to (x + 4) / 4, so silence is 2
    under the maximum. faster-whisper's zeros are instead a mid-level sound to the model,
    the same in every band; OpenAI's Whisper, which the model was trained with, pads the
    audio itself, so its windows end in this floor."""
    return float(features.max()) - 2.0 if features.size else 0.0


def says_words(text: str) -> bool:
    """Does ``text`` hold a word? On a click or a breath Whisper may write punctuation alone
    ("." or "..."): that is no speech, and must not open an item's text or be the context
    of the next turn's final."""
    return any(ch.isalnum() for ch in text)


def repetitive(text: str) -> bool:
    """Is ``text`` a loop rather than speech (faster-whisper's compression-ratio rule)?"""
    data = text.encode()
    return bool(data) and len(data) / len(zlib.compress(data)) > MAX_COMPRESSION_RATIO


def says_too_little(text: str, duration_s: float) -> bool:
    """Does ``text``, a decode of ``duration_s`` of a turn, say too few words for its length?

    Conditioned on the call's earlier finals, tiny.en may end a long turn's decode after
    its first sentences, in one open segment with no time stamp to say where it stopped
    (long3 over the WebSocket: 43 words for 20.3 s, two sentences lost, where the same
    decode without the earlier text said all 70). A text that says something, over at least
    ``TERSE_MIN_S``, slower than ``TERSE_WORDS_PER_S``, is worth a second decode."""
    if duration_s < TERSE_MIN_S or not says_words(text):
        return False
    return len(_WORD.findall(text)) < TERSE_WORDS_PER_S * duration_s


def without_repeated_end(text: str) -> str:
    """``text`` without a repeat at its end: its last words said again, word for word
    (case and punctuation aside), ``REPEAT_MIN_WORDS`` or more of them."""
    found = list(_WORD.finditer(text))
    keys = [m.group().lower() for m in found]
    for n in range(len(keys) // 2, REPEAT_MIN_WORDS - 1, -1):
        if keys[-n:] == keys[-2 * n : -n]:
            return text[: found[-n].start()].rstrip()
    return text


def said_once(segment: str, start_s: float, end_s: float) -> str:
    """A segment's text, without a repeat at its end when its time cannot hold it.

    tiny.en may say a turn's last clause again in the silence after it (the hangover, the
    window's padding), inside the same segment: "... so I walked home in the rain. So I
    walked home in the rain." over 4.2 s (read8's turns had one: 7 of the 118 errors of its
    turns decoded as the live path decodes them, docs/benchmarks.md). faster-whisper's
    compression rule (``repetitive``) does not catch a single repeat, and the segment starts
    inside the audio; but 20 words in 4.2 s is faster than anyone reads, and 13 is not.
    """
    words = len(_WORD.findall(segment))
    if words <= MAX_WORDS_PER_S * max(end_s - start_s, TIMESTAMP_S):
        return segment  # a speaking pace: whatever it repeats was said (most segments)
    return without_repeated_end(segment)


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
    end of the audio, or before the previous segment ended, is dropped, and a segment's
    repeated end its time cannot hold is cut (``said_once``). A decode that ends
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
            texts.append(said_once(decode(words), start, at))
            words, start, last_end = [], None, at
    if words and (start is None or start < duration_s - END_MARGIN_S):
        texts.append(said_once(decode(words), start or 0.0, duration_s))
    elif texts and start is not None and not words and start < duration_s - CONTINUE_MIN_S:
        return Spoken("".join(texts), stopped_at=start)
    elif texts and start is None and last_end < duration_s - UNSAID_MIN_S:
        return Spoken("".join(texts), stopped_at=last_end)
    return Spoken("".join(texts))
