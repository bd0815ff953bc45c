"""The real Silero ONNX model and the energy VAD on real speech."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.config import SegmenterConfig, VadConfig
from agent.detector import SpeechDetector
from agent.segmenter import SegmenterOptions, SpeechPaused, Utterance
from agent.vad import PEEK_SAMPLES, WINDOW_SAMPLES, EnergyVad, SileroVad
from tests.conftest import BECKETT_REGIONS


def regions(detector: SpeechDetector, audio: npt.NDArray[np.float32]) -> list[tuple[float, float]]:
    found = []
    # Feed 20 ms chunks as the live path does: windowing must not depend on chunk size.
    for i in range(0, len(audio), 320):
        found += detector.process(audio[i : i + 320])
    found += detector.flush()
    return [(u.start_ms / 1000, u.end_ms / 1000) for u in found if isinstance(u, Utterance)]


def test_silero_finds_the_six_phrases(beckett_audio: npt.NDArray[np.float32]) -> None:
    options = SegmenterOptions.from_config(VadConfig(), SegmenterConfig())
    got = regions(SpeechDetector(SileroVad().stream(), options), beckett_audio)
    assert len(got) == 6
    for (start, end), (ref_start, ref_end) in zip(got, BECKETT_REGIONS, strict=True):
        assert abs(start - ref_start) <= 0.1 and abs(end - ref_end) <= 0.1, (got, BECKETT_REGIONS)


def test_silero_silence_and_noise_are_not_speech() -> None:
    stream = SileroVad().stream()
    rng = np.random.default_rng(1)
    probs = [
        stream.probability((rng.standard_normal(WINDOW_SAMPLES) * 0.001).astype(np.float32))
        for _ in range(50)
    ]
    assert max(probs) < 0.5


def test_silero_stream_reset_restores_initial_state(
    beckett_audio: npt.NDArray[np.float32],
) -> None:
    stream = SileroVad().stream()
    window = beckett_audio[8000 : 8000 + WINDOW_SAMPLES]
    first = stream.probability(window)
    for _ in range(5):
        stream.probability(window)
    stream.reset()
    assert stream.probability(window) == first


def test_energy_vad_gates_on_rms(beckett_audio: npt.NDArray[np.float32]) -> None:
    stream = EnergyVad(0.01).stream()
    assert stream.probability(np.zeros(WINDOW_SAMPLES, np.float32)) == 0.0
    assert stream.probability(np.full(WINDOW_SAMPLES, 0.05, np.float32)) == 1.0
    options = SegmenterOptions.from_config(VadConfig(kind="energy"), SegmenterConfig())
    got = regions(SpeechDetector(stream, options), beckett_audio)
    assert 4 <= len(got) <= 8  # coarser than Silero but still finds the phrases


def test_silero_peek_leaves_the_stream_unchanged(beckett_audio: npt.NDArray[np.float32]) -> None:
    plain, looked = SileroVad().stream(), SileroVad().stream()
    n = len(beckett_audio) // WINDOW_SAMPLES
    windows = [beckett_audio[k * WINDOW_SAMPLES : (k + 1) * WINDOW_SAMPLES] for k in range(n)]
    expected = [plain.probability(w) for w in windows]
    got, in_speech, in_silence = [], [], []
    for k, w in enumerate(windows):
        got.append(looked.probability(w))
        # A look at exactly the next window is what the stream will say for that window.
        if k + 1 < n:
            end = (k + 2) * WINDOW_SAMPLES
            assert looked.peek(beckett_audio[end - PEEK_SAMPLES : end]) == expected[k + 1]
        end = (k + 1) * WINDOW_SAMPLES + 320  # a look 20 ms past the window, as a chunk ends
        if end <= len(beckett_audio):
            p, t = looked.peek(beckett_audio[end - PEEK_SAMPLES : end]), end / 16_000
            if any(a + 0.15 <= t <= b - 0.05 for a, b in BECKETT_REGIONS):
                in_speech.append(p)
            elif all(t < a - 0.05 or t > b + 0.3 for a, b in BECKETT_REGIONS):
                in_silence.append(p)
    assert got == expected
    # Off the grid, the looks still hear the phrases (measured: >= 0.53 inside, <= 0.08 out).
    assert len(in_speech) > 80 and min(in_speech) > 0.5
    assert len(in_silence) > 80 and max(in_silence) < 0.2


def pauses_before_each_cut(
    audio: npt.NDArray[np.float32], early_pause: bool
) -> tuple[list[int], list[int]]:
    """(at_ms of the pause each utterance was cut on, end_ms of each utterance)."""
    options = SegmenterOptions.from_config(VadConfig(), SegmenterConfig())
    detector = SpeechDetector(SileroVad().stream(), options, speculative=early_pause)
    last_pause: dict[int, int] = {}
    at, ends = [], []
    for i in range(0, len(audio), 320):
        for ev in detector.process(audio[i : i + 320]):
            if isinstance(ev, SpeechPaused):
                last_pause[ev.index] = ev.at_ms
            elif isinstance(ev, Utterance):
                at.append(last_pause[ev.index])
                ends.append(ev.end_ms)
    return at, ends


def test_early_pause_hears_each_phrase_end_sooner(
    beckett_audio: npt.NDArray[np.float32],
) -> None:
    grid, grid_ends = pauses_before_each_cut(beckett_audio, early_pause=False)
    early, early_ends = pauses_before_each_cut(beckett_audio, early_pause=True)
    assert early_ends == grid_ends and len(grid_ends) == 6  # same cuts, same times
    assert grid == [end + 32 for end in grid_ends]  # the grid pauses one window after the end
    # The look pauses after the end of speech but sooner than the grid, at every phrase end.
    assert all(end < at < g for end, at, g in zip(early_ends, early, grid, strict=True))
    saved = [g - at for at, g in zip(early, grid, strict=True)]
    assert sum(saved) / len(saved) >= 10, saved
