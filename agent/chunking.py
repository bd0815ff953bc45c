"""Plan how a long recording is cut for the engine: speech regions → pieces of at most 30 s.

Synchronous, no I/O, no model: the input is one speech probability per 32 ms VAD window
(Silero, or any ``VadStream``), so tests drive it with scripted probabilities. Three steps:

1. ``find_speech_regions``: the turn rule of ``agent/turns.py``, the one the live segmenter
   cuts utterances with (hysteresis, minimum speech, hangover).
2. ``split_long_regions``: a region longer than a piece may be (someone talking for a minute
   without a 200 ms pause) is cut at the longest short pause (a run of windows under the
   lower threshold) in the last ``lookback_s`` before the limit, or failing that at the
   quietest window there, so a cut falls mid-word only when the audio has no pause at all.
3. ``group_regions``: with ``pack`` on, consecutive regions share a piece up to the limit,
   and the piece ends at the longest gap near the limit (a sentence break rather than the
   last short breath); with ``pack`` off every region is its own piece, which is what gives
   per-phrase timestamps (the engines return text only, no word times).

Each piece's audio is its speech plus ``pad_ms`` on both sides, never past half of the gap
to a neighbouring piece, so no audio is sent twice and timestamps stay monotonic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.config import SegmenterConfig, VadConfig
from agent.turns import Ended, TurnDetector, TurnOptions
from agent.vad import WINDOW_MS, WINDOW_SAMPLES

Probabilities = Sequence[float] | npt.NDArray[np.float32]

SAMPLE_RATE = WINDOW_SAMPLES * 1000 // WINDOW_MS  # 16 kHz, the rate the VAD windows assume


@dataclass(frozen=True)
class ChunkingOptions:
    """How a file is cut; ``from_config`` takes the live path's VAD and segmenter settings."""

    turns: TurnOptions = field(default_factory=TurnOptions)
    #: Audio kept around each piece's speech (bounded by half the gap to its neighbours).
    pad_ms: int = 300
    #: Longest audio per engine request: the engines' 30 s window.
    max_piece_s: float = 30.0
    #: How far before the limit a cut may move to land on a longer pause. A third of the
    #: window: pieces stay 20-30 s long but end at a sentence or paragraph break when there
    #: is one (measured: Whisper drops the last phrases of a dense piece cut at a breath).
    lookback_s: float = 10.0
    #: Several speech regions per piece (fast, text only) or one each (per-phrase times).
    pack: bool = True

    @classmethod
    def from_config(
        cls, vad: VadConfig, segmenter: SegmenterConfig, pack: bool = True
    ) -> ChunkingOptions:
        return cls(
            turns=TurnOptions.from_config(vad, segmenter),
            pad_ms=segmenter.prefix_padding_ms,
            max_piece_s=segmenter.max_utterance_s,
            pack=pack,
        )

    @property
    def pad_windows(self) -> int:
        return self.pad_ms // WINDOW_MS

    @property
    def max_speech_windows(self) -> int:
        """Longest speech span of one piece, leaving room for the padding on both sides."""
        usable_ms = self.max_piece_s * 1000 - 2 * self.pad_ms
        return max(int(usable_ms // WINDOW_MS), 1)

    @property
    def lookback_windows(self) -> int:
        return max(int(self.lookback_s * 1000 // WINDOW_MS), 1)


@dataclass(frozen=True)
class SpeechRegion:
    """Speech from window ``start`` (inclusive) to window ``end`` (exclusive)."""

    start: int
    end: int

    @property
    def windows(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Piece:
    """One engine request: ``audio_start:audio_end`` samples holding the speech times."""

    index: int
    #: Speech bounds in seconds: the times reported for this piece's text.
    start_s: float
    end_s: float
    #: Sample range sent to the engine (speech plus padding).
    audio_start: int
    audio_end: int
    #: Speech regions merged into this piece.
    regions: int
    #: Mean speech probability of the piece's speech windows.
    speech_prob: float

    @property
    def audio_s(self) -> float:
        return (self.audio_end - self.audio_start) / SAMPLE_RATE


def window_count(n_samples: int) -> int:
    """VAD windows covering ``n_samples`` (the last one zero-padded)."""
    return -(-n_samples // WINDOW_SAMPLES)


def find_speech_regions(probs: Probabilities, options: ChunkingOptions) -> list[SpeechRegion]:
    """Speech regions by the turn rule, as the live segmenter cuts utterances."""
    turns = TurnDetector(options.turns)
    ended = [e for p in probs for e in turns.push(float(p)) if isinstance(e, Ended)]
    ended += [e for e in turns.finish() if isinstance(e, Ended)]
    return [SpeechRegion(e.start, e.end) for e in ended]


def split_long_regions(
    regions: Sequence[SpeechRegion], probs: Probabilities, options: ChunkingOptions
) -> list[SpeechRegion]:
    """Cut every region longer than a piece at its best pause near the limit."""
    limit = options.max_speech_windows
    out: list[SpeechRegion] = []
    for region in regions:
        rest = region
        while rest.windows > limit:
            first, rest = _split_once(rest, probs, options)
            out.append(first)
        out.append(rest)
    return out


def _split_once(
    region: SpeechRegion, probs: Probabilities, options: ChunkingOptions
) -> tuple[SpeechRegion, SpeechRegion]:
    limit = options.max_speech_windows
    lo = max(region.start + 1, region.start + limit - options.lookback_windows)
    hi = region.start + limit  # the first part may end at most here
    pause = _longest_pause(probs, lo, hi, options.turns.neg_threshold)
    if pause is not None:
        pause_start, pause_end = pause
        return SpeechRegion(region.start, pause_start), SpeechRegion(pause_end, region.end)
    # No pause at all near the limit: cut at the quietest window (likely between words).
    quietest = lo + int(np.argmin(np.asarray(probs[lo:hi], dtype=np.float32)))
    return SpeechRegion(region.start, quietest), SpeechRegion(quietest, region.end)


def _longest_pause(
    probs: Probabilities, lo: int, hi: int, neg_threshold: float
) -> tuple[int, int] | None:
    """The longest run of windows under ``neg_threshold`` inside ``[lo, hi)``; the latest
    of equally long runs (bigger pieces, fewer requests)."""
    best: tuple[int, int] | None = None
    run_start: int | None = None
    for i in range(lo, hi + 1):
        quiet = i < hi and probs[i] < neg_threshold
        if quiet and run_start is None:
            run_start = i
        elif not quiet and run_start is not None:
            if best is None or i - run_start >= best[1] - best[0]:
                best = (run_start, i)
            run_start = None
    return best


def group_regions(
    regions: Sequence[SpeechRegion], options: ChunkingOptions
) -> list[list[SpeechRegion]]:
    """Regions per piece: one each, or packed up to the limit, ending at the best gap."""
    if not options.pack:
        return [[r] for r in regions]
    limit = options.max_speech_windows
    groups: list[list[SpeechRegion]] = []
    i = 0
    while i < len(regions):
        start = regions[i].start
        last_fit = i
        while last_fit + 1 < len(regions) and regions[last_fit + 1].end - start <= limit:
            last_fit += 1
        if last_fit == len(regions) - 1:
            groups.append(list(regions[i:]))
            break
        near_limit = start + limit - options.lookback_windows
        candidates = [k for k in range(i, last_fit + 1) if regions[k].end >= near_limit]
        # Longest gap after the piece; the later of equal gaps. No region ends near the
        # limit (the next one is long): the only possible cut is after the last that fits.
        cut = max(
            candidates or [last_fit],
            key=lambda k: (regions[k + 1].start - regions[k].end, k),
        )
        groups.append(list(regions[i : cut + 1]))
        i = cut + 1
    return groups


def plan_pieces(probs: Probabilities, n_samples: int, options: ChunkingOptions) -> list[Piece]:
    """The whole plan: regions, split, grouped, padded into sample ranges."""
    regions = split_long_regions(find_speech_regions(probs, options), probs, options)
    groups = group_regions(regions, options)
    n_windows = window_count(n_samples)
    pieces: list[Piece] = []
    for index, group in enumerate(groups):
        speech_start, speech_end = group[0].start, group[-1].end
        prev_end = groups[index - 1][-1].end if index else None
        next_start = groups[index + 1][0].start if index + 1 < len(groups) else None
        lower = 0 if prev_end is None else (prev_end + speech_start + 1) // 2
        upper = n_windows if next_start is None else (speech_end + next_start) // 2
        audio_start = max(speech_start - options.pad_windows, lower)
        audio_end = min(speech_end + options.pad_windows, upper)
        speech = np.concatenate(
            [np.asarray(probs[r.start : r.end], dtype=np.float32) for r in group]
        )
        pieces.append(
            Piece(
                index=index,
                start_s=speech_start * WINDOW_SAMPLES / SAMPLE_RATE,
                end_s=min(speech_end * WINDOW_SAMPLES, n_samples) / SAMPLE_RATE,
                audio_start=audio_start * WINDOW_SAMPLES,
                audio_end=min(audio_end * WINDOW_SAMPLES, n_samples),
                regions=len(group),
                speech_prob=float(speech.mean()) if len(speech) else 0.0,
            )
        )
    return pieces
