"""The Voxtral engine on CUDA: bf16, flash SDPA, compiled decode that never recompiles.

Runs on the tiny random Voxtral (built offline), so it needs a GPU but no download. Skipped
where PyTorch sees no CUDA device.
"""

from __future__ import annotations

import os
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
from agent.engines.base import EngineRequest  # noqa: E402
from agent.engines.voxtral import VoxtralEngine, VoxtralOptions  # noqa: E402
from agent.engines.voxtral_fixture import build_tiny_voxtral  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SR = 16_000


def audio(seconds: float, seed: int = 0) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t)
    return (tone + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_voxtral(tmp_path_factory.mktemp("tiny-voxtral-gpu"))


@pytest.fixture(scope="module")
def gpu_engine(tiny_path: Path) -> Iterator[VoxtralEngine]:
    config = EngineConfig(kind="voxtral", model=str(tiny_path), device="cuda", max_batch=4)
    engine = VoxtralEngine(config)
    engine.warmup()  # compiles and captures buckets 1, 2, 4
    yield engine
    engine.close()


def test_bf16_sdpa_flash_and_compiled(gpu_engine: VoxtralEngine) -> None:
    model = gpu_engine._model
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"
    # PyTorch's own layers: no Hugging Face Hub kernels swapped in at load (which would fetch
    # code at start-up, and fails offline, when the weights are loaded straight onto the GPU).
    assert not getattr(model, "use_kernels", False)
    assert torch.backends.cuda.flash_sdp_enabled()
    assert gpu_engine.compiled


def test_compile_counters_stay_flat_while_serving(gpu_engine: VoxtralEngine) -> None:
    from torch._dynamo.utils import counters

    before = {key: dict(counters[key]) for key in ("stats", "recompiles", "graph_break")}
    cases = [(0.2, None), (1.0, "en"), (4.5, "fr"), (12.0, None), (29.9, "de"), (2.0, "ja")]
    requests = [EngineRequest(audio(d, i), language=lang) for i, (d, lang) in enumerate(cases)]
    for request in requests:
        gpu_engine.transcribe([request])
    for size in (2, 3, 4):
        gpu_engine.transcribe(requests[:size])
    gpu_engine.transcribe(requests)  # 6 items: split into 4 + 2
    after = {key: dict(counters[key]) for key in before}
    assert after == before


def test_gpu_log_mel_matches_the_processor(gpu_engine: VoxtralEngine, tiny_path: Path) -> None:
    from transformers import VoxtralProcessor

    extractor = VoxtralProcessor.from_pretrained(str(tiny_path)).feature_extractor
    clips = [audio(3.3, 1), audio(30.0, 2)]
    features = gpu_engine._mel(clips)
    assert features.device.type == "cuda"
    for clip, mine in zip(clips, features.cpu().numpy(), strict=True):
        reference = extractor(
            clip, sampling_rate=SR, padding=True, pad_to_multiple_of=30 * SR, return_tensors="np"
        )["input_features"][0]
        np.testing.assert_allclose(mine, reference, atol=1e-3)


def test_batched_equals_unbatched_on_cuda(tiny_path: Path) -> None:
    # float32 without TF32: bf16 kernels differ by batch size, and a random model's greedy
    # choice can flip on such noise; the batching logic is what this test is about.
    from transformers import VoxtralForConditionalGeneration, VoxtralProcessor

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model: Any = VoxtralForConditionalGeneration.from_pretrained(
            str(tiny_path), dtype=torch.float32, attn_implementation="sdpa"
        ).to("cuda")
        processor = VoxtralProcessor.from_pretrained(str(tiny_path))
        config = EngineConfig(kind="voxtral", model=str(tiny_path), device="cuda", max_batch=4)
        engine = VoxtralEngine(config, VoxtralOptions(), model=model, processor=processor)
        engine.warmup()
        requests = [
            EngineRequest(audio(1.0, 0), language="en"),
            EngineRequest(audio(2.5, 1)),
            EngineRequest(audio(0.3, 2), language="fr"),
        ]
        batched = engine.transcribe(requests)
        assert batched == [engine.transcribe([r])[0] for r in requests]
        engine.close()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
