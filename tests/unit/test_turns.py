"""The turn rule (agent/turns.py) on its own, and the live and file paths built on it agreeing
on the same probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.chunking import ChunkingOptions, SpeechRegion, find_speech_regions
from agent.segmenter import Segmenter, SegmenterOptions, SpeechStarted, Utterance
from agent.turns import Dropped, Ended, Opened, Paused, Resumed, Started, TurnDetector, TurnOptions
from agent.vad import WINDOW_MS, WINDOW_SAMPLES

# Runs of windows at one probability: long enough to cross every duration the rule has,
# with values on both sides of both thresholds (0.5 and 0.35 by default).
runs = st.lists(
    st.tuples(
        st.integers(1, 14),
        st.one_of(
            st.sampled_from([0.0, 0.2, 0.34, 0.35, 0.4, 0.49, 0.5, 0.9]),
            st.floats(0.0, 1.0),
        ),
    ),
    max_size=30,
)
options = st.builds(
    TurnOptions,
    threshold=st.sampled_from([0.3, 0.5, 0.7, 0.005]),
    min_speech_ms=st.sampled_from([0, 32, 100, 250]),
    min_silence_ms=st.sampled_from([32, 64, 200, 500]),
)


def expand(script: list[tuple[int, float]]) -> list[float]:
    """One probability per window, as float32 like the VAD's (a file's come as an array)."""
    return [float(np.float32(p)) for n, p in script for _ in range(n)]


def live_regions(probs: list[float], turns: TurnOptions, padding_ms: int) -> list[SpeechRegion]:
    """What a call's segmenter cuts from these probabilities, as window ranges."""
    seg = Segmenter(SegmenterOptions(turns=turns, prefix_padding_ms=padding_ms))
    events = []
    for p in probs:
        events.extend(seg.push(np.zeros(WINDOW_SAMPLES, np.float32), p))
    events.extend(seg.flush())
    started = [e.start_ms for e in events if isinstance(e, SpeechStarted)]
    cuts = [e for e in events if isinstance(e, Utterance)]
    assert [u.start_ms for u in cuts] == started  # every cut was announced, once
    assert all(u.start_ms % WINDOW_MS == 0 and u.end_ms % WINDOW_MS == 0 for u in cuts)
    return [SpeechRegion(u.start_ms // WINDOW_MS, u.end_ms // WINDOW_MS) for u in cuts]


@settings(max_examples=300, deadline=None)
@given(script=runs, turns=options, padding_ms=st.sampled_from([0, 96, 300]))
def test_a_call_and_a_file_cut_the_same_probabilities_into_the_same_regions(
    script: list[tuple[int, float]], turns: TurnOptions, padding_ms: int
) -> None:
    probs = expand(script)  # at most 420 windows (13 s): under the 30 s forced cut
    file_regions = find_speech_regions(np.asarray(probs, np.float32), ChunkingOptions(turns))
    assert live_regions(probs, turns, padding_ms) == file_regions


@settings(max_examples=300, deadline=None)
@given(script=runs, turns=options)
def test_regions_follow_the_rule(script: list[tuple[int, float]], turns: TurnOptions) -> None:
    """Each region opens at ``threshold``, ends on a speech window, spans the minimum speech,
    holds no silence as long as the hangover, and is followed by one (or the end)."""
    probs = expand(script)
    regions = find_speech_regions(probs, ChunkingOptions(turns))
    for prev, region in zip([None, *regions], regions, strict=False):
        assert prev is None or prev.end + turns.min_silence_windows <= region.start
        assert probs[region.start] >= turns.threshold
        assert region.windows >= max(turns.min_speech_windows, 1)
        assert turns.is_speech(probs[region.end - 1]) or region.windows == 1
        silent = 0
        for p in probs[region.start + 1 : region.end]:
            silent = 0 if turns.is_speech(p) else silent + 1
            assert silent < turns.min_silence_windows
        after = probs[region.end : region.end + turns.min_silence_windows]
        assert not any(turns.is_speech(p) for p in after)
    # Nothing at threshold is left outside a region unless it was a blip.
    covered = {i for r in regions for i in range(r.start, r.end)}
    turns_seen = TurnDetector(turns)
    dropped = [e for p in probs for e in turns_seen.push(p) if isinstance(e, Dropped)]
    dropped += [e for e in turns_seen.finish() if isinstance(e, Dropped)]
    blips = {i for d in dropped for i in range(d.start, d.end)}
    loud = [i for i, p in enumerate(probs) if p >= turns.threshold and turns.is_speech(p)]
    assert all(i in covered or i in blips for i in loud)


def test_events_of_one_turn_in_order() -> None:
    turns = TurnDetector(TurnOptions(threshold=0.5, min_speech_ms=100, min_silence_ms=200))
    probs = [0.0, 0.9, 0.9, 0.9, 0.9, 0.1, 0.4, 0.1, 0.1] + [0.0] * 7
    seen = [(i, e) for i, p in enumerate(probs) for e in turns.push(p)]
    assert seen == [
        (1, Opened(1)),
        (4, Started(1)),  # 4 windows = 128 ms >= 100 ms of speech
        (5, Paused(5)),
        (6, Resumed()),  # 0.4 is above 0.35: speech continues
        (7, Paused(7)),
        (13, Ended(1, 7)),  # 7 silent windows = 224 ms >= 200 ms
    ]
    assert not turns.open and turns.finish() == []


def test_a_look_between_windows_pauses_early_and_the_next_window_decides() -> None:
    turns = TurnDetector(TurnOptions(min_speech_ms=0))
    turns.push(0.9)
    assert turns.confirmed and not turns.paused
    assert turns.peek(0.9) is False  # speech still
    assert turns.peek(0.1) is True and turns.paused
    assert turns.peek(0.1) is False  # already paused: one pause per silence
    assert turns.push(0.1) == []  # the window confirms the look's pause: no second one
    assert turns.push(0.9) == [Resumed()]
    assert turns.peek(0.1) is True
    assert turns.push(0.9) == [Resumed()]  # the window overrules the look


def test_options_derive_their_thresholds_once_and_reject_nonsense() -> None:
    opts = TurnOptions(threshold=0.6, min_speech_ms=100, min_silence_ms=200)
    assert opts.neg_threshold == pytest.approx(0.45)
    assert (opts.min_speech_windows, opts.min_silence_windows) == (4, 7)
    assert TurnOptions(threshold=0.1).neg_threshold == 0.01
    with pytest.raises(ValueError):
        TurnOptions(threshold=1.0)
    with pytest.raises(ValueError):
        TurnOptions(min_silence_ms=-1)
