"""The Voxtral Realtime engine on CUDA: bf16 loading, the batched step against transformers
in fp32 on the GPU, and the compiled step. Tiny random model, built offline; skipped where
PyTorch sees no CUDA device (not yet run: written where no GPU was lent; the compiled step's
CUDA graphs are unverified)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mistral_common")

from agent.config import EngineConfig  # noqa: E402
from agent.engines.base import StreamText  # noqa: E402
from agent.engines.voxtral_realtime import VoxtralRealtimeEngine  # noqa: E402
from agent.engines.voxtral_realtime_fixture import build_tiny_voxtral_realtime  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SR = 16_000


def audio(seconds: float, seed: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tone = 0.3 * np.sin(2 * np.pi * (250 + 60 * seed + 180 * np.sin(1.3 * t)) * t)
    return (tone + 0.03 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_voxtral_realtime(tmp_path_factory.mktemp("voxtral-rt-gpu"))


def run(engine: VoxtralRealtimeEngine, clips: list[npt.NDArray[np.float32]]) -> list[list[int]]:
    done = [threading.Event() for _ in clips]

    def sink(i: int) -> object:
        def on_update(update: StreamText) -> None:
            if update.done:
                done[i].set()

        return on_update

    streams = [engine.open_stream(sink(i)) for i in range(len(clips))]  # type: ignore[arg-type]
    for stream, clip in zip(streams, clips, strict=True):
        stream.push(clip)
        stream.flush()
    for event in done:
        assert event.wait(120)
    for stream in streams:
        stream.close()
    return [list(s.token_ids) for s in streams]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def bf16_engine(tiny: Path) -> Iterator[VoxtralRealtimeEngine]:
    config = EngineConfig(kind="voxtral_realtime", model=str(tiny), device="cuda", max_streams=8)
    engine = VoxtralRealtimeEngine(config)
    engine.warmup()
    yield engine
    engine.close()


def test_bf16_on_cuda(bf16_engine: VoxtralRealtimeEngine) -> None:
    model = bf16_engine._model
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.bfloat16
    tokens = run(bf16_engine, [audio(3.0, i) for i in range(4)])
    assert all(len(t) > 30 for t in tokens)
    assert any(n > 1 for n in bf16_engine.step_sizes)


def test_fp32_on_cuda_equals_transformers_generate(tiny: Path) -> None:
    from tests.unit.test_voxtral_realtime import reference_tokens

    config = EngineConfig(kind="voxtral_realtime", model=str(tiny), device="cuda", max_streams=4)
    loaded = VoxtralRealtimeEngine(config)
    fp32 = VoxtralRealtimeEngine(config, model=loaded._model.float(), processor=loaded._processor)
    loaded.close()
    try:
        clips = [audio(3.0, i) for i in range(3)]
        for clip, tokens in zip(clips, run(fp32, clips), strict=True):
            assert tokens == reference_tokens(fp32, clip, 480, tiny)
    finally:
        fp32.close()


def test_compiled_step_agrees_with_eager(tiny: Path, bf16_engine: VoxtralRealtimeEngine) -> None:
    """``engine.compile`` on CUDA: CUDA graphs per bucket (1 … 8), recorded by ``warmup()`` on
    the engine thread; nothing compiles after it, and the tokens follow the eager engine's."""
    from torch._dynamo.utils import counters

    config = EngineConfig(
        kind="voxtral_realtime", model=str(tiny), device="cuda", max_streams=8, compile=True
    )
    compiled = VoxtralRealtimeEngine(config)
    try:
        compiled.warmup()
        graphs = counters["stats"]["unique_graphs"]
        clips = [audio(3.0, i) for i in range(4)]
        with torch._dynamo.config.patch(error_on_recompile=True):
            eager, fast = run(bf16_engine, clips), run(compiled, clips)
        assert counters["stats"]["unique_graphs"] == graphs
        assert counters["inductor"]["cudagraph_skips"] == 0  # the graphs did run as graphs
        same = sum(
            a == b for e, f in zip(eager, fast, strict=True) for a, b in zip(e, f, strict=True)
        )
        total = sum(len(e) for e in eager)
        assert same / total > 0.9  # bf16 kernels may break near-ties differently
    finally:
        compiled.close()
