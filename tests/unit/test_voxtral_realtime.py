"""The Voxtral Realtime engine on a tiny random model, on the CPU, through its own loading code.

transformers' streaming ``generate`` (one stream, its own caches) is the reference: the
engine's batched step over per-stream slots must give the same tokens, for every stream,
whoever else is in the batch. The fixture's sliding windows are short (encoder 40
positions, decoder 24 tokens), so a few seconds of audio wrap the engine's rings.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mistral_common")

from agent.config import EngineConfig  # noqa: E402
from agent.engines import create_engine  # noqa: E402
from agent.engines.base import EngineRequest, StreamText  # noqa: E402
from agent.engines.voxtral_realtime import RealtimeOptions, VoxtralRealtimeEngine  # noqa: E402
from agent.engines.voxtral_realtime_fixture import (  # noqa: E402
    build_processor,
    build_tiny_voxtral_realtime,
)
from agent.engines.voxtral_realtime_step import LogMel  # noqa: E402
from agent.engines.voxtral_realtime_streams import (  # noqa: E402
    CHUNK_SAMPLES,
    LEFT_PAD_TOKENS,
    StreamAudio,
)
from agent.errors import ConfigError, EngineError  # noqa: E402

SR = 16_000
Audio = npt.NDArray[np.float32]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-core machines: torch's pool would fight the other tests
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_voxtral_realtime(tmp_path_factory.mktemp("tiny-voxtral-rt"))


@pytest.fixture(scope="module")
def engine(tiny_path: Path) -> Iterator[VoxtralRealtimeEngine]:
    config = EngineConfig(kind="voxtral_realtime", model=str(tiny_path), device="cpu")
    built = create_engine(config)  # the server's own factory and loading code
    assert isinstance(built, VoxtralRealtimeEngine)
    yield built
    built.close()


def speech_like(seconds: float, seed: int) -> Audio:
    """A gliding tone with noise and pauses: the random model's text follows it."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tone = 0.3 * np.sin(2 * np.pi * (250 + 60 * seed + 180 * np.sin(1.3 * t + seed)) * t)
    gate = (np.sin(2 * np.pi * 0.7 * t + seed) > -0.3).astype(np.float64)
    return (tone * gate + 0.03 * rng.standard_normal(t.size)).astype(np.float32)


def reference_tokens(
    engine: VoxtralRealtimeEngine, audio: Audio, delay_ms: int, tmp: Path
) -> list[int]:
    """transformers' streaming generate on the same audio, framed as the engine frames it."""
    model = engine._model
    processor = engine._processor
    if delay_ms != 480:  # the processor takes its delay from its tekken.json
        processor = build_processor(tmp / f"processor-{delay_ms}", delay_ms)
    framing = StreamAudio(delay_ms // 80)
    framing.push(audio)
    framing.flush()
    first = framing.take_first()[LEFT_PAD_TOKENS * 1280 :]
    inputs = processor(first, is_streaming=True, is_first_audio_chunk=True, return_tensors="pt")
    inputs = inputs.to(model.device)  # the GPU tests reuse this
    assert inputs["input_ids"].shape[1] == LEFT_PAD_TOKENS + delay_ms // 80 + 1

    def features() -> Iterator[Any]:
        yield inputs["input_features"]
        while framing.ready():
            chunk = framing.take_next()
            yield processor(
                chunk, is_streaming=True, is_first_audio_chunk=False, return_tensors="pt"
            )["input_features"].to(model.device)

    out = model.generate(
        input_ids=inputs["input_ids"], input_features=features(), num_delay_tokens=delay_ms // 80
    )
    return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]


class Collector:
    def __init__(self) -> None:
        self.updates: list[StreamText] = []
        self.done = threading.Event()
        self.arrived = threading.Condition()

    def __call__(self, update: StreamText) -> None:
        with self.arrived:
            self.updates.append(update)
            self.arrived.notify_all()
        if update.done:
            self.done.set()

    def wait_count(self, count: int, timeout: float = 30) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.updates) >= count, timeout), (
                len(self.updates),
                count,
            )

    @property
    def text(self) -> str:
        return "".join(u.text for u in self.updates)


def run_alone(
    engine: VoxtralRealtimeEngine, audio: Audio, delay_ms: int = 480, push: int = 4000
) -> tuple[list[int], str]:
    sink = Collector()
    stream = engine.open_stream(sink, delay_ms=delay_ms)
    for i in range(0, len(audio), push):
        stream.push(audio[i : i + push])
    stream.flush()
    assert sink.done.wait(60)
    stream.close()
    return list(stream.token_ids), sink.text  # type: ignore[attr-defined]


# -- framing --------------------------------------------------------------------------


def test_chunk_log_mel_is_the_whole_signals_log_mel(engine: VoxtralRealtimeEngine) -> None:
    """The first chunk (centred, behind the left padding) and the 1680-sample chunks after it
    give exactly the frames of the whole padded signal's log-mel."""
    audio = speech_like(2.0, 0)
    logmel = LogMel(engine._processor.feature_extractor, torch.device("cpu"))
    framing = StreamAudio(6)
    framing.push(audio)
    pieces = [logmel(torch.from_numpy(framing.take_first())[None], center=True)]
    while framing.ready():
        pieces.append(logmel(torch.from_numpy(framing.take_next())[None], center=False))
    streamed = torch.cat(pieces, dim=-1)
    padded = np.concatenate([np.zeros(LEFT_PAD_TOKENS * 1280, np.float32), audio])
    whole = logmel(torch.from_numpy(padded)[None], center=True)[..., : streamed.shape[-1]]
    assert streamed.shape[-1] == (LEFT_PAD_TOKENS + 7 + len(pieces) - 1) * 8
    torch.testing.assert_close(streamed, whole, atol=1e-4, rtol=1e-4)
    # Our log-mel is the feature extractor's.
    chunk = audio[:CHUNK_SAMPLES]
    theirs = engine._processor.feature_extractor(
        chunk, sampling_rate=SR, center=False, return_tensors="pt"
    )
    torch.testing.assert_close(
        logmel(torch.from_numpy(chunk)[None], center=False), theirs["input_features"]
    )


# -- against transformers ---------------------------------------------------------------


def test_batched_streams_equal_transformers_generate_token_for_token(
    engine: VoxtralRealtimeEngine, tmp_path: Path
) -> None:
    audios = [speech_like(s, seed) for seed, s in enumerate((3.0, 2.2, 3.6))]
    sinks = [Collector() for _ in audios]
    before = sum(n * c for n, c in engine.step_sizes.items() if n > 1)
    streams = [engine.open_stream(sink) for sink in sinks]
    with engine._cond:  # all three arrive before the engine's next round: a batch on any box
        for stream, audio in zip(streams, audios, strict=True):
            stream.push(audio)
            stream.flush()
    for sink in sinks:
        assert sink.done.wait(60)
    for stream in streams:
        stream.close()
    assert sum(n * c for n, c in engine.step_sizes.items() if n > 1) > before  # batched
    for stream, audio, sink in zip(streams, audios, sinks, strict=True):
        ref = reference_tokens(engine, audio, 480, tmp_path)
        assert list(stream.token_ids) == ref  # type: ignore[attr-defined]
        decoded = engine._tokenizer.decode(ref, skip_special_tokens=True)
        assert sink.text == decoded
        assert len(set(ref)) > 2  # the output follows the audio, not one filler token


def test_a_streams_tokens_are_the_same_alone_and_among_streams_joining_and_leaving(
    engine: VoxtralRealtimeEngine,
) -> None:
    main = speech_like(4.0, 7)
    alone, _ = run_alone(engine, main)
    others = [speech_like(3.0, seed) for seed in (1, 2, 3)]
    frame = 1280
    leave_after = 12  # each guest leaves after this many frames, mid-stream and unflushed
    # The updates a guest's 12 frames make (its prefill and each step): it leaves only once
    # they are out, so a slow box cannot close it before the engine ever stepped it.
    framing = StreamAudio(480 // 80)
    framing.push(np.zeros(leave_after * frame, np.float32))
    guest_updates = 0
    while framing.ready():
        _ = framing.take_first() if guest_updates == 0 else framing.take_next()
        guest_updates += 1
    assert guest_updates >= 3  # a prefill and at least two steps among the others
    mixed_before = sum(c for n, c in engine.step_sizes.items() if n > 1)
    sink = Collector()
    stream = engine.open_stream(sink)
    guests: list[tuple[Any, Collector]] = []
    joins = {3: 0, 9: 1, 14: 2}  # frame index -> which other stream joins then
    pushed_frames: dict[int, int] = {}
    for i in range(0, len(main) // frame):
        if i in joins:
            guest_sink = Collector()
            guests.append((engine.open_stream(guest_sink), guest_sink))
            pushed_frames[len(guests) - 1] = 0
        # One index's frames arrive together, as the engine's lock sees them: the round after
        # a guest's frame holds the main stream's frame too, whatever the box's speed, so the
        # guest's steps are batched steps.
        with engine._cond:
            stream.push(main[i * frame : (i + 1) * frame])
            for g, (guest, _) in enumerate(guests):
                n = pushed_frames[g]
                if n < leave_after:
                    guest.push(others[g][n * frame : (n + 1) * frame])
                    pushed_frames[g] = n + 1
        for g, (guest, guest_sink) in enumerate(guests):
            if pushed_frames[g] == leave_after:
                guest_sink.wait_count(guest_updates)
                guest.close()  # leaves mid-stream, unflushed
                pushed_frames[g] = leave_after + 1
        time.sleep(0.004)  # let steps interleave with the joins and leaves
    stream.flush()
    assert sink.done.wait(60)
    stream.close()
    assert sum(c for n, c in engine.step_sizes.items() if n > 1) > mixed_before
    assert list(stream.token_ids) == alone  # type: ignore[attr-defined]


@pytest.mark.parametrize("push", [1, 160, 1279, 1681, 7001, SR])
def test_push_sizes_do_not_change_the_output(engine: VoxtralRealtimeEngine, push: int) -> None:
    audio = speech_like(2.5 if push > 1 else 1.2, 4)
    reference, _ = run_alone(engine, audio, push=len(audio))
    assert run_alone(engine, audio, push=push)[0] == reference


@pytest.mark.parametrize("delay_ms", [80, 160, 480, 1200])
def test_no_token_before_its_audio_and_the_delay_is_honoured(
    engine: VoxtralRealtimeEngine, delay_ms: int, tmp_path: Path
) -> None:
    """Token 0 needs (d + 1) × 1280 + 40 samples (d = delay / 80 ms), token k ≥ 1 needs
    (d + k + 1) × 1280 + 200: one sample fewer and it does not come."""
    audio = speech_like(2.0, 5)
    d = delay_ms // 80
    sink = Collector()
    stream = engine.open_stream(sink, delay_ms=delay_ms)
    assert stream.delay_ms == delay_ms
    pushed = 0
    for k in range(4):
        needed = (d + 1) * 1280 + 40 if k == 0 else (d + k + 1) * 1280 + 200
        stream.push(audio[pushed : needed - 1])
        pushed = needed - 1
        time.sleep(0.05)  # time enough for a step that should not happen
        assert len(sink.updates) == k
        stream.push(audio[pushed:needed])
        pushed = needed
        sink.wait_count(k + 1)
        assert (sink.updates[k].start_ms, sink.updates[k].end_ms) == (80 * k, 80 * (k + 1))
    stream.push(audio[pushed:])
    stream.flush()
    assert sink.done.wait(60)
    stream.close()
    assert list(stream.token_ids) == reference_tokens(engine, audio, delay_ms, tmp_path)  # type: ignore[attr-defined]


# -- whole utterances, limits, config --------------------------------------------------


def test_transcribe_streams_each_utterance_and_matches_a_stream(
    engine: VoxtralRealtimeEngine,
) -> None:
    a, b = speech_like(1.5, 8), speech_like(2.0, 9)
    results = engine.transcribe([EngineRequest(a), EngineRequest(b)])
    assert [r.text for r in results] == [
        run_alone(engine, a)[1].strip(),
        run_alone(engine, b)[1].strip(),
    ]


def test_streams_are_bounded_and_refused_with_too_many_calls(tiny_path: Path) -> None:
    config = EngineConfig(
        kind="voxtral_realtime", model=str(tiny_path), device="cpu", max_streams=2
    )
    small = VoxtralRealtimeEngine(config)
    try:
        first, second = small.open_stream(Collector()), small.open_stream(Collector())
        assert not small.admits()
        with pytest.raises(EngineError) as refused:
            small.open_stream(Collector())
        assert refused.value.code == "too_many_calls"
        first.close()
        assert small.admits()
        small.step_s = 0.07  # the recent steps took 70 ms of every 80: no room for another
        assert not small.admits()
        second.close()  # nothing open: the next stream starts from a clean slate
        assert small.admits()
        with pytest.raises(EngineError) as bad:
            small.open_stream(Collector(), delay_ms=100)
        assert bad.value.code == "invalid_value"
    finally:
        small.close()


def test_a_stream_behind_real_time_says_so() -> None:
    framing = StreamAudio(6)
    framing.push(np.zeros(9000 + 1280 * 5, np.float32))
    assert framing.backlog_ms() == pytest.approx(5 * 80)
    framing.take_first()
    assert framing.backlog_ms() == pytest.approx((9000 + 5 * 1280 - 10440) / 16)


@pytest.mark.parametrize(
    ("key", "value"), [("delay_ms", 100), ("delay_ms", 0), ("delay_ms", 2480), ("max_streams", 0)]
)
def test_config_rejects_bad_values(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"engine.{key}"):
        EngineConfig(kind="voxtral_realtime", **{key: value}).validate()  # type: ignore[arg-type]


def test_slow_steps_refuse_new_streams_before_the_open_ones_fall_behind(tiny_path: Path) -> None:
    """Steps that take over 60 ms of every 80 (a busy GPU, played by a sleep around the
    real step): the open stream goes on, but no new stream is let in."""
    config = EngineConfig(kind="voxtral_realtime", model=str(tiny_path), device="cpu")
    slow = VoxtralRealtimeEngine(config)
    real_step = slow._step

    def busy_step(*args: Any) -> Any:
        time.sleep(0.07)
        return real_step(*args)

    slow._step = busy_step
    try:
        sink = Collector()
        stream = slow.open_stream(sink)
        audio = speech_like(2.0, 3)
        stream.push(audio[:9000])
        for i in range(9000, len(audio), 1280):  # in real time
            stream.push(audio[i : i + 1280])
            time.sleep(0.08)
        assert slow.step_s > 0.06  # the sleep alone is 70 ms: whatever the machine
        assert len(sink.updates) > 5
        assert not slow.admits()
        with pytest.raises(EngineError) as refused:
            slow.open_stream(Collector())
        assert refused.value.code == "too_many_calls"
        stream.close()
        assert slow.admits()
    finally:
        slow.close()


def test_a_step_that_fails_ends_its_streams_with_an_error(tiny_path: Path) -> None:
    config = EngineConfig(kind="voxtral_realtime", model=str(tiny_path), device="cpu")
    broken = VoxtralRealtimeEngine(config)

    def failing_step(*args: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access (stand-in)")

    broken._step = failing_step
    try:
        sink = Collector()
        stream = broken.open_stream(sink)
        stream.push(speech_like(1.5, 1))
        assert sink.done.wait(30)
        assert sink.updates[-1].error == "engine_error"
        assert broken.admits() and broken.open_streams == 0
    finally:
        broken.close()


# -- compiled, one graph per batch-size bucket --------------------------------------------


def settle(engine: VoxtralRealtimeEngine, live: list[tuple[Any, Collector]]) -> None:
    """Wait until the engine has stepped every frame that is in and sent its token."""
    deadline = time.monotonic() + 60
    while True:
        with engine._cond:
            busy = engine._work_locked() or any(
                len(sink.updates) < stream.audio.tokens for stream, sink in live
            )
        if not busy:
            return
        assert time.monotonic() < deadline, "the engine did not settle"
        time.sleep(0.002)


@pytest.mark.slow
def test_compiled_buckets_equal_eager_with_streams_across_buckets_and_never_recompile(
    engine: VoxtralRealtimeEngine, tiny_path: Path
) -> None:
    """``engine.compile``: one inductor graph per bucket (2 and 4 rows for 4 slots: two
    buckets keep the compile time down), all built by ``warmup()``. Then streams join and
    leave so that steps run at both buckets, with idle and padding rows (free slots, and a
    live stream that has no frame this step): each stream's tokens equal the eager engine's
    for that stream alone, and nothing compiles.

    Pushes happen under the engine's lock, a tick at a time, and the test waits for the
    engine to settle after each: which streams step together is fixed, whatever the speed.
    """
    from torch._dynamo.utils import counters

    config = EngineConfig(
        kind="voxtral_realtime", model=str(tiny_path), device="cpu", max_streams=4, compile=True
    )
    compiled = VoxtralRealtimeEngine(config, RealtimeOptions(batch_buckets=(2,)))
    try:
        assert compiled._batch.buckets == (2, 4)
        graphs = counters["stats"]["unique_graphs"]
        compiled.warmup()
        assert counters["stats"]["unique_graphs"] - graphs == 2  # one whole graph per bucket
        graphs = counters["stats"]["unique_graphs"]
        shapes_before = compiled.step_shapes.copy()

        frame = 1280
        # name: (seed, opens at tick, ends at tick, flushed at the end?, pushes every n ticks)
        plan = {
            "a": (11, 0, 40, False, 1),  # slot 0, leaves unflushed
            "b": (12, 5, 70, True, 1),  # slot 1
            "c": (13, 12, 55, False, 1),  # slot 2: 3 rows run in the bucket of 4
            "d": (14, 18, 62, False, 2),  # slot 3, a frame every other tick: an idle live row
            "e": (15, 45, 80, True, 1),  # slot 0 again, after a left
        }
        audio = {name: speech_like(6.0, seed) for name, (seed, *_rest) in plan.items()}
        pushed = dict.fromkeys(plan, 0)
        streams: dict[str, tuple[Any, Collector]] = {}
        with torch._dynamo.config.patch(error_on_recompile=True):
            for tick in range(81):
                with compiled._cond:  # every push of the tick lands before the next round
                    for name, (_, opens, ends, _flush, every) in plan.items():
                        if tick == opens:
                            sink = Collector()
                            streams[name] = (compiled.open_stream(sink), sink)
                        if name not in streams or not opens <= tick < ends:
                            continue
                        if (tick - opens) % every == 0:
                            stream = streams[name][0]
                            stream.push(audio[name][pushed[name] : pushed[name] + frame])
                            pushed[name] += frame
                live = [pair for pair in streams.values() if not pair[0].closed]
                settle(compiled, live)
                for name, (_, _, ends, flush, _) in plan.items():
                    if tick == ends - 1 and name in streams:
                        stream, sink = streams[name]
                        if flush:
                            stream.flush()
                            assert sink.done.wait(60)
                        stream.close()
        assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after warm-up
        shapes = compiled.step_shapes - shapes_before
        # (streams stepping, rows): every bucket, with padding and with idle live rows.
        assert {(1, 2), (2, 2), (3, 4), (4, 4)} <= set(shapes), shapes
        slots = {name: stream.slot for name, (stream, _) in streams.items()}
        assert slots == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 0}
        for name, (stream, sink) in streams.items():
            tokens = list(stream.token_ids)
            assert not any(u.error for u in sink.updates)
            alone, _ = run_alone(engine, audio[name][: pushed[name]])
            if plan[name][3]:
                assert tokens == alone, name
            else:  # left unflushed: the tokens it had
                assert len(tokens) > 10 and tokens == alone[: len(tokens)], name
    finally:
        compiled.close()


def test_batch_buckets_always_hold_every_slot(engine: VoxtralRealtimeEngine) -> None:
    from agent.engines.voxtral_realtime_step import BatchedRealtime

    extractor = engine._processor.feature_extractor
    default = BatchedRealtime(engine._model, extractor, 6)
    assert default.buckets == (1, 2, 4, 6)
    assert [default.bucket(n) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    chosen = BatchedRealtime(engine._model, extractor, 8, buckets=(4, 1))
    assert chosen.buckets == (1, 4, 8)  # the slot count is always a bucket
    assert [chosen.bucket(n) for n in (1, 2, 5, 8)] == [1, 4, 8, 8]
    for bad in ((0,), (9,)):
        with pytest.raises(ValueError, match="batch buckets"):
            BatchedRealtime(engine._model, extractor, 8, buckets=bad)
