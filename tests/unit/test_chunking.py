"""File chunking planned from scripted VAD probabilities: regions, long-region splits at the
best pause, packing at the longest gap, padding, and the 30 s limit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from agent.chunking import (
    ChunkingOptions,
    SpeechRegion,
    find_speech_regions,
    group_regions,
    plan_pieces,
    split_long_regions,
)
from agent.config import SegmenterConfig, VadConfig
from agent.turns import TurnOptions
from agent.vad import WINDOW_SAMPLES

W_PER_S = 1000 / 32  # VAD windows per second


def w(seconds: float) -> int:
    """Windows in ``seconds``."""
    return round(seconds * W_PER_S)


def script(*parts: tuple[float, float]) -> np.ndarray:
    """Probabilities from ``(seconds, probability)`` runs."""
    return np.concatenate([np.full(w(s), p, dtype=np.float32) for s, p in parts])


def at(*seconds: float) -> int:
    """The window where runs of these lengths end (the same rounding as ``script``)."""
    return sum(w(s) for s in seconds)


def test_regions_use_hysteresis_and_drop_blips() -> None:
    probs = script(
        (1.0, 0.0),
        (0.064, 0.9),  # 64 ms blip: under min_speech_ms, dropped
        (1.0, 0.0),
        (1.0, 0.9),
        (0.15, 0.1),  # a 150 ms dip: shorter than min_silence_ms, same region
        (1.0, 0.4),  # between the thresholds: speech continues
        (1.0, 0.0),
    )
    regions = find_speech_regions(
        probs, ChunkingOptions(TurnOptions(min_speech_ms=100, min_silence_ms=200))
    )
    assert regions == [SpeechRegion(at(1.0, 0.064, 1.0), at(1.0, 0.064, 1.0, 1.0, 0.15, 1.0))]


def test_speech_to_the_end_of_the_file_is_a_region() -> None:
    probs = script((1.0, 0.0), (2.0, 0.8))
    assert find_speech_regions(probs, ChunkingOptions()) == [SpeechRegion(w(1.0), at(1.0, 2.0))]


def test_silence_plans_nothing() -> None:
    probs = script((5.0, 0.05))
    assert plan_pieces(probs, len(probs) * WINDOW_SAMPLES, ChunkingOptions()) == []


def test_long_region_is_cut_at_the_longest_pause_near_the_limit() -> None:
    opts = ChunkingOptions(
        TurnOptions(min_silence_ms=300), max_piece_s=10.0, pad_ms=0, lookback_s=4.0
    )
    # 20 s of speech with short pauses (under min_silence) at 5 s, 7 s (longest) and 8.5 s.
    probs = script(
        (5.0, 0.9), (0.1, 0.1), (1.9, 0.9), (0.25, 0.1), (1.25, 0.9), (0.1, 0.1), (11.4, 0.9)
    )
    regions = find_speech_regions(probs, opts)
    assert len(regions) == 1
    pieces = split_long_regions(regions, probs, opts)
    first = pieces[0]
    # The 5 s pause is outside the look-back window; the 250 ms one at 7 s wins over the
    # 100 ms one at 8.5 s although that one is closer to the limit.
    assert first == SpeechRegion(0, at(5.0, 0.1, 1.9))
    assert pieces[1].start == at(5.0, 0.1, 1.9, 0.25)
    assert all(p.windows <= opts.max_speech_windows for p in pieces)
    assert pieces[-1].end == regions[0].end


def test_long_region_without_pause_is_cut_at_the_quietest_window() -> None:
    opts = ChunkingOptions(max_piece_s=10.0, pad_ms=0, lookback_s=2.0)
    probs = script((20.0, 0.95))
    dip = w(9.0)
    probs[dip] = 0.5  # still speech, but the quietest moment near the limit
    pieces = split_long_regions(find_speech_regions(probs, opts), probs, opts)
    assert pieces[0] == SpeechRegion(0, dip)
    assert pieces[1].start == dip
    assert sum(p.windows for p in pieces) == len(probs)


def test_packing_ends_pieces_at_the_longest_gap_near_the_limit() -> None:
    opts = ChunkingOptions(max_piece_s=10.0, pad_ms=0, lookback_s=5.0)
    regions = [
        SpeechRegion(w(0.0), w(2.0)),
        SpeechRegion(w(2.5), w(5.0)),
        SpeechRegion(w(6.5), w(7.5)),  # followed by the longest gap (1.5 s)
        SpeechRegion(w(9.0), w(9.8)),
        SpeechRegion(w(10.2), w(12.0)),  # would not fit
        SpeechRegion(w(12.5), w(14.0)),
    ]
    groups = group_regions(regions, opts)
    assert groups[0] == regions[:3]
    assert groups[1] == regions[3:]


def test_unpacked_plan_is_one_piece_per_region() -> None:
    regions = [SpeechRegion(0, 10), SpeechRegion(30, 40)]
    assert group_regions(regions, ChunkingOptions(pack=False)) == [[r] for r in regions]


def test_pieces_are_padded_without_overlap_and_monotonic() -> None:
    opts = ChunkingOptions(pad_ms=300, pack=False)
    probs = script((1.0, 0.0), (1.0, 0.9), (0.4, 0.0), (1.0, 0.9), (1.0, 0.0))
    n_samples = len(probs) * WINDOW_SAMPLES - 100  # the last window is partial
    pieces = plan_pieces(probs, n_samples, opts)
    assert len(pieces) == 2
    a, b = pieces
    assert a.start_s == pytest.approx(1.0, abs=0.04) and a.end_s == pytest.approx(2.0, abs=0.04)
    assert b.start_s == pytest.approx(2.4, abs=0.04) and b.end_s == pytest.approx(3.4, abs=0.05)
    # 300 ms of padding outside, but only half of the 400 ms gap between them.
    assert a.audio_start == pytest.approx(0.7 * 16000, abs=WINDOW_SAMPLES)
    assert a.audio_end <= b.audio_start
    assert b.audio_start - a.audio_end < WINDOW_SAMPLES
    assert b.audio_end <= n_samples
    assert a.end_s <= b.start_s


def test_every_piece_fits_the_engine_window_on_a_long_file() -> None:
    rng = np.random.default_rng(7)
    parts: list[tuple[float, float]] = []
    for _ in range(400):  # ~20 minutes of speech with pauses of random length
        parts.append((float(rng.uniform(0.3, 12.0)), 0.9))
        parts.append((float(rng.uniform(0.05, 1.5)), 0.05))
    parts.append((70.0, 0.9))  # one monologue with no pause at all
    probs = script(*parts)
    n_samples = len(probs) * WINDOW_SAMPLES
    for pack in (True, False):
        pieces = plan_pieces(probs, n_samples, ChunkingOptions(pack=pack))
        assert all(p.audio_s <= 30.0 + 1e-6 for p in pieces)
        assert all(p.start_s < p.end_s for p in pieces)
        for prev, nxt in itertools.pairwise(pieces):
            assert prev.end_s <= nxt.start_s
            assert prev.audio_end <= nxt.audio_start
        speech = find_speech_regions(probs, ChunkingOptions())
        covered = sum(r.windows for r in split_long_regions(speech, probs, ChunkingOptions()))
        assert covered >= sum(r.windows for r in speech) - 2 * len(speech)
    packed = plan_pieces(probs, n_samples, ChunkingOptions(pack=True))
    unpacked = plan_pieces(probs, n_samples, ChunkingOptions(pack=False))
    assert len(packed) < len(unpacked) / 2


def test_options_follow_the_live_configuration() -> None:
    opts = ChunkingOptions.from_config(
        VadConfig(threshold=0.6), SegmenterConfig(min_silence_ms=300, max_utterance_s=20)
    )
    assert opts.turns == TurnOptions(threshold=0.6, min_speech_ms=100, min_silence_ms=300)
    assert opts.max_piece_s == 20
    assert opts.turns.neg_threshold == pytest.approx(0.45)
