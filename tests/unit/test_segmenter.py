"""The segmenter driven by scripted VAD probabilities: exact times, no audio model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from agent.segmenter import (
    Segmenter,
    SegmenterOptions,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    Utterance,
)
from agent.turns import TurnOptions
from agent.vad import WINDOW_MS, WINDOW_SAMPLES

OPTS = SegmenterOptions(
    turns=TurnOptions(threshold=0.5, min_speech_ms=100, min_silence_ms=200),
    prefix_padding_ms=300,
    max_utterance_ms=30_000,
)


def run(probs: list[float], options: SegmenterOptions = OPTS, flush: bool = False) -> list:
    """Push one window per probability; each window's samples hold its index (traceable)."""
    seg = Segmenter(options)
    out = []
    for i, p in enumerate(probs):
        out.extend(seg.push(np.full(WINDOW_SAMPLES, i, dtype=np.float32), p))
    if flush:
        out.extend(seg.flush())
    return out


def windows(ms: int) -> int:
    return ms // WINDOW_MS


def test_onset_reports_first_speech_window_after_min_speech() -> None:
    probs = [0.0] * 20 + [0.9] * 10 + [0.0] * 10
    evs = run(probs)
    started = [e for e in evs if isinstance(e, SpeechStarted)]
    assert started == [SpeechStarted(index=0, start_ms=20 * WINDOW_MS)]


def test_hangover_then_stop_and_utterance() -> None:
    probs = [0.0] * 20 + [0.9] * 10 + [0.0] * 10
    evs = run(probs)
    kinds = [type(e) for e in evs]
    assert kinds == [SpeechStarted, SpeechPaused, SpeechStopped, Utterance]
    stopped = evs[2]
    assert stopped.end_ms == 30 * WINDOW_MS  # end of the last speech window
    # 200 ms of silence = 7 windows of 32 ms (224 ms) before the stop is decided.
    assert stopped.decided_ms - stopped.end_ms == 7 * WINDOW_MS
    utt = evs[3]
    assert utt.cut == "silence" and utt.start_ms == 20 * WINDOW_MS and utt.end_ms == 30 * WINDOW_MS


def test_pre_roll_prepends_prefix_padding() -> None:
    probs = [0.0] * 20 + [0.9] * 10 + [0.0] * 10
    utt = next(e for e in run(probs) if isinstance(e, Utterance))
    pre = -(-300 // WINDOW_MS)  # 10 windows of pre-roll (ceil(300 / 32))
    assert utt.audio_start_ms == (20 - pre) * WINDOW_MS
    first_window_index = utt.audio[0]
    assert first_window_index == 20 - pre
    # pre-roll + 10 speech windows + 7 hangover windows, in order, nothing lost
    idx = utt.audio[::WINDOW_SAMPLES]
    assert list(idx) == list(range(20 - pre, 20 + 10 + 7))


def test_pre_roll_is_clipped_at_call_start() -> None:
    probs = [0.0] * 2 + [0.9] * 10 + [0.0] * 10
    utt = next(e for e in run(probs) if isinstance(e, Utterance))
    assert utt.audio_start_ms == 0


def test_short_blip_is_rejected_silently() -> None:
    probs = [0.0] * 10 + [0.9] * 2 + [0.0] * 20  # 64 ms < min_speech 100 ms
    assert run(probs) == []


def test_blip_audio_becomes_pre_roll_of_next_speech() -> None:
    probs = [0.0] * 10 + [0.9] * 2 + [0.0] * 3 + [0.9] * 10 + [0.0] * 10
    evs = run(probs)
    started = [e for e in evs if isinstance(e, SpeechStarted)]
    # The blip and the speech are within min_silence: one region, onset at the blip.
    assert started == [SpeechStarted(0, 10 * WINDOW_MS)]


def test_hysteresis_keeps_speech_between_thresholds() -> None:
    # 0.4 is below threshold (0.5) but above the end threshold (0.35): speech continues.
    probs = [0.9] * 5 + [0.4] * 20 + [0.0] * 10
    evs = run(probs)
    stopped = [e for e in evs if isinstance(e, SpeechStopped)]
    assert stopped[0].end_ms == 25 * WINDOW_MS


def test_brief_pause_shorter_than_hangover_does_not_split() -> None:
    probs = [0.9] * 10 + [0.0] * 5 + [0.9] * 10 + [0.0] * 10  # 160 ms pause < 200 ms
    evs = run(probs)
    assert sum(isinstance(e, Utterance) for e in evs) == 1


def test_forced_cut_at_max_utterance() -> None:
    opts = SegmenterOptions(prefix_padding_ms=0, max_utterance_ms=3200)
    probs = [0.9] * 250 + [0.0] * 10  # 8 s of speech, 3.2 s limit
    evs = run(probs, opts)
    utts = [e for e in evs if isinstance(e, Utterance)]
    assert [u.cut for u in utts] == ["max_length", "max_length", "silence"]
    assert all(len(u.audio) <= 3200 * 16 for u in utts)
    assert len(utts[0].audio) == (3200 // WINDOW_MS) * WINDOW_SAMPLES  # as full as fits
    # Every speech window reaches an utterance exactly once across the cuts.
    covered = np.concatenate([u.audio[::WINDOW_SAMPLES] for u in utts])
    assert set(range(250)) <= set(covered.astype(int).tolist())
    starts = [e for e in evs if isinstance(e, SpeechStarted)]
    stops = [e for e in evs if isinstance(e, SpeechStopped)]
    assert len(starts) == len(stops) == 3
    assert [s.index for s in starts] == [0, 1, 2]


def test_flush_hands_over_open_speech() -> None:
    evs = run([0.0] * 5 + [0.9] * 10, flush=True)
    assert [type(e) for e in evs] == [SpeechStarted, SpeechStopped, Utterance]
    assert evs[-1].cut == "end_of_call"


def test_flush_without_speech_gives_nothing() -> None:
    assert run([0.0] * 30, flush=True) == []


def test_manual_mode_accumulates_until_commit() -> None:
    seg = Segmenter(SegmenterOptions(turn_detection=False))
    for i in range(20):
        assert seg.push(np.full(WINDOW_SAMPLES, i, np.float32), 0.9 if i % 2 else 0.0) == []
    (utt,) = seg.commit()
    assert isinstance(utt, Utterance) and utt.cut == "commit"
    assert len(utt.audio) == 20 * WINDOW_SAMPLES
    assert seg.commit() == []  # nothing left


def test_commit_in_vad_mode_cuts_open_speech_only() -> None:
    seg = Segmenter(OPTS)
    for _ in range(5):
        seg.push(np.zeros(WINDOW_SAMPLES, np.float32), 0.0)
    assert seg.commit() == []
    for _ in range(5):
        seg.push(np.zeros(WINDOW_SAMPLES, np.float32), 0.9)
    evs = seg.commit()
    assert [type(e) for e in evs] == [SpeechStopped, Utterance]


def test_clear_drops_open_speech() -> None:
    seg = Segmenter(OPTS)
    for _ in range(5):
        seg.push(np.zeros(WINDOW_SAMPLES, np.float32), 0.9)
    seg.clear()
    evs = []
    for _ in range(10):
        evs += seg.push(np.zeros(WINDOW_SAMPLES, np.float32), 0.0)
    assert evs == []
    assert seg.flush() == []


def test_update_changes_hangover() -> None:
    seg = Segmenter(OPTS)
    seg.update(SegmenterOptions(turns=TurnOptions(min_silence_ms=500)))
    evs = []
    for p in [0.9] * 10 + [0.0] * 10:  # 320 ms of silence < 500 ms
        evs += seg.push(np.zeros(WINDOW_SAMPLES, np.float32), p)
    assert not any(isinstance(e, SpeechStopped) for e in evs)


def test_wrong_window_size_is_rejected() -> None:
    with pytest.raises(ValueError):
        Segmenter(OPTS).push(np.zeros(100, np.float32), 0.5)


def test_pause_carries_audio_so_far_and_resume_voids_it() -> None:
    probs = [0.0] * 5 + [0.9] * 10 + [0.0] * 3 + [0.9] * 5 + [0.0] * 10
    evs = run(probs, SegmenterOptions(prefix_padding_ms=0))
    kinds = [type(e) for e in evs]
    assert kinds == [
        SpeechStarted,
        SpeechPaused,
        SpeechResumed,
        SpeechPaused,
        SpeechStopped,
        Utterance,
    ]
    first_pause, second_pause, utt = evs[1], evs[3], evs[5]
    assert first_pause.at_ms == 16 * WINDOW_MS
    # The pause snapshot is the region's audio up to and including the first silent window,
    # then the rest of the hangover (6 of its 7 windows) as digital silence.
    assert list(first_pause.audio[::WINDOW_SAMPLES]) == [*range(5, 16), *[0] * 6]
    assert not first_pause.audio[11 * WINDOW_SAMPLES :].any()
    # As long as the cut: the final utterance is the last pause's snapshot with the
    # hangover heard in place of that silence.
    heard = len(second_pause.audio) - 6 * WINDOW_SAMPLES
    assert len(second_pause.audio) == len(utt.audio)
    assert np.array_equal(utt.audio[:heard], second_pause.audio[:heard])
    assert utt.audio[heard:].all() and not second_pause.audio[heard:].any()


def test_unconfirmed_blip_never_pauses() -> None:
    assert run([0.9] * 2 + [0.0] * 10) == []


def test_thirty_second_cut_never_exceeds_thirty_seconds() -> None:
    """30 000 ms is not a multiple of 32 ms: the cut must fall below it, not just after."""
    evs = run([0.9] * 1000, SegmenterOptions(max_utterance_ms=30_000))
    utt = next(e for e in evs if isinstance(e, Utterance))
    assert utt.cut == "max_length"
    assert len(utt.audio) <= 30 * 16000


# -- looks between windows (peek) ---------------------------------------------------------


def confirmed_speech(options: SegmenterOptions = OPTS) -> Segmenter:
    """A segmenter 5 silent then 10 speech windows in: speech confirmed, not paused."""
    seg = Segmenter(options)
    for i, p in enumerate([0.0] * 5 + [0.9] * 10):
        seg.push(np.full(WINDOW_SAMPLES, i, dtype=np.float32), p)
    assert seg.in_speech and not seg.paused
    return seg


def test_peek_pauses_before_the_window_and_the_window_confirms_it() -> None:
    seg = confirmed_speech()
    tail = np.full(160, -1.0, dtype=np.float32)  # 10 ms heard since the last whole window
    (pause,) = seg.peek(0.1, tail)
    assert isinstance(pause, SpeechPaused)
    assert pause.at_ms == 15 * WINDOW_MS + 10
    # Everything heard so far: pre-roll + speech windows, then the partial tail; then the
    # hangover's 7 windows less the tail's 160 samples, unheard, as digital silence.
    heard = 15 * WINDOW_SAMPLES + 160
    assert len(pause.audio) == heard + 7 * WINDOW_SAMPLES - 160
    assert np.array_equal(pause.audio[heard - 160 : heard], tail)
    assert not pause.audio[heard:].any()
    assert seg.paused
    assert seg.peek(0.0, tail) == []  # one pause, not one per look
    # The silent window confirms the pause: no second SpeechPaused; the hangover cuts as usual.
    evs = []
    for _ in range(7):  # 7 x 32 ms: the first run of windows reaching 200 ms
        evs += seg.push(np.zeros(WINDOW_SAMPLES, np.float32), 0.0)
    assert [type(e) for e in evs] == [SpeechStopped, Utterance]
    stop, utt = evs
    assert stop.end_ms == 15 * WINDOW_MS  # times stay on the window grid
    assert utt.cut == "silence"
    assert len(utt.audio) == len(pause.audio)  # the speculative decode heard the cut's length
    assert not seg.paused


def test_peek_pause_withdrawn_when_the_window_is_speech() -> None:
    seg = confirmed_speech()
    assert [type(e) for e in seg.peek(0.2, np.zeros(320, np.float32))] == [SpeechPaused]
    assert seg.push(np.zeros(WINDOW_SAMPLES, np.float32), 0.8) == [SpeechResumed(0)]
    assert not seg.paused
    # A later silence can pause again, from a look or from a window.
    assert [type(e) for e in seg.peek(0.1, np.zeros(320, np.float32))] == [SpeechPaused]


def test_peek_ignored_unless_confirmed_speech_sounds_silent() -> None:
    seg = confirmed_speech()
    tail = np.zeros(320, np.float32)
    assert seg.peek(0.4, tail) == []  # above threshold - 0.15: still speech (hysteresis)
    unconfirmed = Segmenter(OPTS)
    unconfirmed.push(np.zeros(WINDOW_SAMPLES, np.float32), 0.9)  # speech, not yet 100 ms
    assert unconfirmed.peek(0.0, tail) == []
    assert Segmenter(OPTS).peek(0.0, tail) == []  # no speech at all
    manual = Segmenter(replace(OPTS, turn_detection=False))
    manual.push(np.zeros(WINDOW_SAMPLES, np.float32), 0.9)
    assert manual.peek(0.0, tail) == []  # client-driven commits: no pauses
    # Already paused by a silent window: a look adds nothing.
    seg.push(np.zeros(WINDOW_SAMPLES, np.float32), 0.0)
    assert seg.paused and seg.peek(0.0, tail) == []
