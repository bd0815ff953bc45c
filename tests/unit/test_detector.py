"""The detector with a scripted VAD stream: windows, interims and looks between windows."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.detector import DetectorEvent, InterimDue, SpeechDetector
from agent.segmenter import (
    SegmenterOptions,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    Utterance,
)
from agent.turns import TurnOptions
from agent.vad import PEEK_SAMPLES, WINDOW_SAMPLES, VadStream

SPEECH, SILENCE = 0.25, 0.0  # sample values the scripted stream reads as speech / silence


class LoudnessStream(VadStream):
    """Probability 0.9 when a window's newest sample is loud, else 0.0; counts its calls."""

    def __init__(self) -> None:
        self.windows = 0
        self.peeks: list[int] = []  # length of what each look was given

    def probability(self, window: npt.NDArray[np.float32]) -> float:
        assert len(window) == WINDOW_SAMPLES
        self.windows += 1
        return 0.9 if window[-1] >= SPEECH else 0.0

    def peek(self, recent: npt.NDArray[np.float32]) -> float:
        self.peeks.append(len(recent))
        return 0.9 if recent[-1] >= SPEECH else 0.0


def feed(detector: SpeechDetector, audio: npt.NDArray[np.float32]) -> list[DetectorEvent]:
    """20 ms chunks, as a live call delivers them."""
    found: list[DetectorEvent] = []
    for i in range(0, len(audio), 320):
        found += detector.process(audio[i : i + 320])
    return found


def speech_then_pause(speech_ms: int, pause_ms: int) -> npt.NDArray[np.float32]:
    return np.concatenate(
        [np.full(speech_ms * 16, SPEECH, np.float32), np.full(pause_ms * 16, SILENCE, np.float32)]
    )


OPTS = SegmenterOptions(turns=TurnOptions(min_silence_ms=200), prefix_padding_ms=0)


def test_early_pause_comes_from_the_first_silent_chunk_not_the_next_window() -> None:
    stream = LoudnessStream()
    detector = SpeechDetector(stream, OPTS, speculative=True)
    # 640 ms of speech ends on a window boundary (20 windows) and a chunk boundary (32 chunks).
    found = feed(detector, speech_then_pause(640, 400))
    kinds = [type(e) for e in found]
    assert kinds == [SpeechStarted, SpeechPaused, SpeechStopped, Utterance]
    pause, utt = found[1], found[3]
    assert isinstance(pause, SpeechPaused) and isinstance(utt, Utterance)
    # The first chunk of silence (640..660 ms) is heard as a partial window: pause at 660 ms,
    # where the window grid alone would pause at 672 ms.
    assert pause.at_ms == 660
    # What it heard (660 ms, the last 20 silent), then the hangover it has not heard yet as
    # digital silence: the very audio the cut hands over when the silence holds.
    assert not pause.audio[640 * 16 :].any()
    assert np.array_equal(pause.audio, utt.audio)
    assert utt.end_ms == 640 and utt.cut == "silence"
    assert stream.peeks and set(stream.peeks) == {PEEK_SAMPLES}


def test_without_early_pause_the_detector_never_looks() -> None:
    stream = LoudnessStream()
    found = feed(SpeechDetector(stream, OPTS), speech_then_pause(640, 400))
    pause = next(e for e in found if isinstance(e, SpeechPaused))
    assert pause.at_ms == 672  # the first silent window, 640..672 ms
    assert stream.peeks == []


def test_looks_only_while_speech_is_open_and_unpaused() -> None:
    stream = LoudnessStream()
    detector = SpeechDetector(stream, OPTS, speculative=True)
    feed(detector, np.zeros(16_000, np.float32))  # a second of silence: nothing to look for
    assert stream.peeks == []
    audio = speech_then_pause(640, 400)
    looks_at: list[tuple[type, int]] = []  # (event type, looks so far) at each event
    for i in range(0, len(audio), 320):
        looks_at += [(type(ev), len(stream.peeks)) for ev in detector.process(audio[i : i + 320])]
    kinds = [kind for kind, _ in looks_at]
    assert kinds == [SpeechStarted, SpeechPaused, SpeechStopped, Utterance]
    n_started, n_paused, n_stopped, _ = [n for _, n in looks_at]
    assert n_started <= 1  # none before speech was confirmed (at most the confirming chunk's)
    assert n_paused > n_started  # looks while speech is open ...
    assert n_stopped == n_paused  # ... none once paused, nor after the stop


def test_a_short_gap_heard_early_is_withdrawn_by_the_next_window() -> None:
    stream = LoudnessStream()
    detector = SpeechDetector(stream, OPTS, speculative=True, interim_interval_ms=0)
    # 20 ms of silence inside speech at 640..660 ms: the look pauses, the window (640..672,
    # newest sample loud again) resumes.
    audio = np.concatenate(
        [
            np.full(640 * 16, SPEECH, np.float32),
            np.full(20 * 16, SILENCE, np.float32),
            speech_then_pause(500, 400),
        ]
    )
    found = feed(detector, audio)
    kinds = [type(e) for e in found if not isinstance(e, InterimDue)]
    assert kinds == [
        SpeechStarted,
        SpeechPaused,
        SpeechResumed,
        SpeechPaused,
        SpeechStopped,
        Utterance,
    ]


def interims_ms(speculative: bool) -> list[int]:
    """Audio ms in each InterimDue over 2 s of speech with a 20 ms gap at 960 ms."""
    detector = SpeechDetector(
        LoudnessStream(), OPTS, interim_interval_ms=500, speculative=speculative
    )
    audio = np.concatenate(
        [
            np.full(960 * 16, SPEECH, np.float32),
            np.full(20 * 16, SILENCE, np.float32),
            speech_then_pause(1000, 400),
        ]
    )
    at = []
    for i in range(0, len(audio), 320):
        at += [
            len(ev.audio) // 16
            for ev in detector.process(audio[i : i + 320])
            if isinstance(ev, InterimDue)
        ]
    return at


def test_a_speculative_pause_counts_as_the_interim() -> None:
    # Speech confirmed at 128 ms: the first interim half an interval (8 windows) after that,
    # then one every 512 ms (16 windows) of audio ...
    assert interims_ms(speculative=False) == [384, 896, 1408, 1920]
    # ... unless the gap, heard at 980 ms, started a decode of the audio so far: the window
    # grid's clock is then at 960 ms, so the next interim is due 16 windows later, at 1472
    # (a whole interval: only the onset gets the head start).
    assert interims_ms(speculative=True) == [384, 896, 1472]
