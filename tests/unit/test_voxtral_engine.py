"""The Voxtral engine on a tiny random Voxtral, on the CPU, through its own loading code.

The weights are random, so the text is gibberish: these tests check the machinery (prompt
layout, features, batching, bounds, errors, the worker), not transcription quality.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, even by mistake
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mistral_common")

from agent.config import EngineConfig  # noqa: E402
from agent.engines.base import EngineRequest  # noqa: E402
from agent.engines.voxtral import VoxtralEngine, VoxtralOptions  # noqa: E402
from agent.engines.voxtral_features import (  # noqa: E402
    AUDIO_TOKENS_PER_CHUNK,
    N_FRAMES,
    N_MELS,
    batch_buckets,
    max_new_tokens,
)
from agent.engines.voxtral_fixture import build_tiny_voxtral  # noqa: E402
from agent.engines.worker import EngineWorker  # noqa: E402
from agent.errors import EngineError, EngineLoadError  # noqa: E402

SR = 16_000


@pytest.fixture(scope="session")
def tiny_voxtral_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_voxtral(tmp_path_factory.mktemp("tiny-voxtral"))


@pytest.fixture(scope="session")
def tiny_config(tiny_voxtral_path: Path) -> EngineConfig:
    return EngineConfig(kind="voxtral", model=str(tiny_voxtral_path), device="cpu", max_batch=8)


@pytest.fixture(scope="session")
def engine(tiny_config: EngineConfig) -> Iterator[VoxtralEngine]:
    loaded = VoxtralEngine(tiny_config)
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def processor(tiny_voxtral_path: Path) -> Any:
    from transformers import VoxtralProcessor

    return VoxtralProcessor.from_pretrained(str(tiny_voxtral_path))


def audio(seconds: float, seed: int = 0) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t)
    return (tone + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


# -- prompt layout ------------------------------------------------------------------------


def test_prompt_layout_with_language(engine: VoxtralEngine, processor: Any) -> None:
    prompt = engine._prompts.get("fr")
    tokenizer = processor.tokenizer
    lang_ids = tokenizer.encode("lang:fr", add_special_tokens=False)
    head = tokenizer.convert_tokens_to_ids(["<s>", "[INST]", "[BEGIN_AUDIO]"])
    tail = tokenizer.convert_tokens_to_ids(["[/INST]"])
    transcribe = tokenizer.convert_tokens_to_ids(["[TRANSCRIBE]"])
    assert list(prompt.ids) == [*head, *[24] * 375, *tail, *lang_ids, *transcribe]
    assert AUDIO_TOKENS_PER_CHUNK == 375
    # The same ids as the processor's own TranscriptionRequest path.
    reference = processor.apply_transcription_request(
        audio=[audio(2.0)], model_id="x", language="fr", sampling_rate=SR, format="wav"
    )
    assert reference["input_ids"][0].tolist() == list(prompt.ids)
    assert engine._prompts.get(" FR ") == prompt


def test_prompt_without_language_has_no_lang_tokens(engine: VoxtralEngine, processor: Any) -> None:
    ids = list(engine._prompts.get(None).ids)
    text = processor.tokenizer.decode(ids, skip_special_tokens=False)
    assert "lang:" not in text
    assert ids[-2:] == processor.tokenizer.convert_tokens_to_ids(["[/INST]", "[TRANSCRIBE]"])
    assert ids.count(24) == 375
    assert len(engine._prompts.get("en")) > len(ids)


def test_engine_language_is_the_default(
    tiny_config: EngineConfig, engine: VoxtralEngine, processor: Any
) -> None:
    german = VoxtralEngine(
        replace(tiny_config, language="de"),
        model=engine._model,
        processor=processor,
    )
    (result,) = german.transcribe([EngineRequest(audio(0.5))])
    assert result.language == "de"
    (result,) = german.transcribe([EngineRequest(audio(0.5), language="it")])
    assert result.language == "it"
    (result,) = engine.transcribe([EngineRequest(audio(0.5))])
    assert result.language is None


# -- features -----------------------------------------------------------------------------


def test_log_mel_shape_and_values_match_the_processor(
    engine: VoxtralEngine, processor: Any
) -> None:
    clips = [audio(2.3, 1), audio(30.0, 2), audio(0.01, 3)]
    features = engine._mel(clips)
    assert tuple(features.shape) == (3, N_MELS, N_FRAMES) == (3, 128, 3000)
    extractor = processor.feature_extractor
    for clip, mine in zip(clips, features.numpy(), strict=True):
        padded = np.pad(clip, (0, 30 * SR - clip.size))[None]
        reference = extractor(
            clip, sampling_rate=SR, padding=True, pad_to_multiple_of=30 * SR, return_tensors="np"
        )["input_features"][0]
        np.testing.assert_allclose(mine, reference, atol=1e-4)
        # And Whisper's original numpy recipe, which computes in float64.
        numpy_path = extractor._np_extract_fbank_features(padded, "cpu")[0]
        np.testing.assert_allclose(mine, numpy_path, atol=1e-3)


# -- batching and bounds -------------------------------------------------------------------


def test_batched_greedy_equals_unbatched(engine: VoxtralEngine) -> None:
    # Different lengths and languages, so prompts are left-padded to different widths.
    requests = [
        EngineRequest(audio(1.0, 0), language="en"),
        EngineRequest(audio(2.5, 1)),
        EngineRequest(audio(0.3, 2), language="fr"),
        EngineRequest(audio(1.7, 3), language="de"),
        EngineRequest(audio(0.8, 4)),
    ]
    batched, timings = engine.transcribe_timed(requests)
    assert timings.batch_size == 5 and timings.bucket == 8
    singles = [engine.transcribe([request])[0] for request in requests]
    assert batched == singles
    assert all(result.text for result in batched)


@pytest.mark.parametrize("language", [None, "en"])
def test_matches_transformers_generate(engine: VoxtralEngine, language: str | None) -> None:
    """Prefill, static cache, positions and masks give what plain ``generate`` gives."""
    clip = audio(1.5, 7)
    prompt = engine._prompts.get(language)
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        out = engine._model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            input_features=engine._mel([clip]),
            max_new_tokens=max_new_tokens(1.5, per_second=8.0, margin=16, cap=256),
            do_sample=False,
            eos_token_id=engine._eos_id,
        )
    expected = engine._tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    (result,) = engine.transcribe([EngineRequest(clip, language=language)])
    assert result.text == expected.strip()


def test_batches_larger_than_the_largest_bucket_are_split(
    engine: VoxtralEngine, processor: Any
) -> None:
    small = VoxtralEngine(
        EngineConfig(kind="voxtral", device="cpu", max_batch=2),
        model=engine._model,
        processor=processor,
    )
    assert small._buckets == (1, 2)
    requests = [EngineRequest(audio(0.5, seed)) for seed in range(3)]
    assert small.transcribe(requests) == [small.transcribe([r])[0] for r in requests]


def test_max_new_tokens_grows_with_duration_and_is_capped() -> None:
    bound = dict(per_second=8.0, margin=16, cap=256)
    assert max_new_tokens(1.0, **bound) == 24
    assert max_new_tokens(10.0, **bound) == 96
    assert max_new_tokens(30.0, **bound) == 256
    assert max_new_tokens(0.1, **bound) == 17
    values = [max_new_tokens(s / 2, **bound) for s in range(61)]
    assert values == sorted(values)


def test_batch_buckets_are_powers_of_two_up_to_max_batch() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(64)[-1] == 64 and len(batch_buckets(64)) == 7


def test_decoding_stops_at_the_bound(
    tiny_config: EngineConfig, engine: VoxtralEngine, processor: Any
) -> None:
    options = VoxtralOptions(tokens_per_second=2.0, token_margin=1, max_new_tokens=5)
    bounded = VoxtralEngine(tiny_config, options, model=engine._model, processor=processor)
    _, timings = bounded.transcribe_timed([EngineRequest(audio(1.0))])  # bound 3 tokens
    assert timings.decode_steps <= 2
    _, timings = bounded.transcribe_timed([EngineRequest(audio(20.0))])  # capped at 5
    assert timings.decode_steps <= 4
    _, timings = engine.transcribe_timed([EngineRequest(audio(1.0))], force_new_tokens=7)
    assert timings.decode_steps == 6


def test_sampling_with_a_temperature(
    tiny_config: EngineConfig, engine: VoxtralEngine, processor: Any
) -> None:
    warm = VoxtralEngine(
        replace(tiny_config, temperature=1.0), model=engine._model, processor=processor
    )
    texts = {warm.transcribe([EngineRequest(audio(0.5))])[0].text for _ in range(3)}
    assert len(texts) > 1  # a random 131k-token vocabulary at T=1 never repeats itself


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "language", "code"),
    [
        (np.zeros(0, dtype=np.float32), None, "empty_audio"),
        (np.full(SR, np.nan, dtype=np.float32), None, "invalid_audio"),
        (np.zeros(31 * SR, dtype=np.float32), None, "audio_too_long"),
        (np.zeros((2, SR), dtype=np.float32), None, "invalid_audio"),
        (np.zeros(SR, dtype=np.float32), "klingon", "invalid_language"),
    ],
)
def test_bad_items_raise_typed_errors(
    engine: VoxtralEngine, samples: Any, language: str | None, code: str
) -> None:
    with pytest.raises(EngineError) as info:
        engine.transcribe([EngineRequest(samples, language=language)])
    assert info.value.code == code


def test_a_bad_item_is_named_in_a_batch(engine: VoxtralEngine) -> None:
    good = EngineRequest(audio(0.5))
    with pytest.raises(EngineError, match="item 1: audio is empty") as info:
        engine.transcribe([good, EngineRequest(np.zeros(0, dtype=np.float32)), good])
    assert info.value.code == "empty_audio"
    assert engine.transcribe([good])[0].text  # the engine still serves


@pytest.mark.parametrize(
    ("raised", "code"),
    [(RuntimeError("kernel exploded"), "engine_error"), (torch.OutOfMemoryError(), "engine_oom")],
)
def test_failures_while_serving_become_engine_errors(
    tiny_config: EngineConfig,
    engine: VoxtralEngine,
    processor: Any,
    monkeypatch: pytest.MonkeyPatch,
    raised: Exception,
    code: str,
) -> None:
    failing = VoxtralEngine(tiny_config, model=engine._model, processor=processor)
    expected = failing.transcribe([EngineRequest(audio(0.5))])

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise raised

    monkeypatch.setattr(failing, "_step", explode)
    with pytest.raises(EngineError) as info:
        failing.transcribe([EngineRequest(audio(0.5))])
    assert info.value.code == code
    monkeypatch.undo()
    assert failing.transcribe([EngineRequest(audio(0.5))]) == expected  # caches were reset


def test_load_errors_name_cause_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # Read at import: another test module may have imported the hub client before us.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EngineLoadError, match="no such folder"):
        VoxtralEngine(EngineConfig(kind="voxtral", model=str(tmp_path / "nope"), device="cpu"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineLoadError, match=r"lacks tekken\.json, \*\.safetensors") as info:
        VoxtralEngine(EngineConfig(kind="voxtral", model=str(tmp_path), device="cpu"))
    assert "hf download" in str(info.value)
    with pytest.raises(EngineLoadError, match="cannot load Voxtral from 'nobody/no-such-model'"):
        VoxtralEngine(EngineConfig(kind="voxtral", model="nobody/no-such-model", device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_load_error(tiny_voxtral_path: Path) -> None:
    config = EngineConfig(kind="voxtral", model=str(tiny_voxtral_path), device="cuda")
    with pytest.raises(EngineLoadError, match=r"sees no CUDA GPU.*engine\.device to auto or cpu"):
        VoxtralEngine(config)


def test_create_engine_builds_voxtral(tiny_config: EngineConfig) -> None:
    from agent.engines import create_engine

    built = create_engine(tiny_config)
    assert isinstance(built, VoxtralEngine) and not built.compiled
    built.close()


# -- through the engine worker --------------------------------------------------------------


async def test_runs_behind_the_engine_worker(
    tiny_config: EngineConfig, engine: VoxtralEngine, processor: Any
) -> None:
    # Its own instance (sharing the weights): the worker closes its engine when it stops.
    served = VoxtralEngine(tiny_config, model=engine._model, processor=processor)
    worker = await EngineWorker.start(tiny_config, served)
    try:
        requests = [EngineRequest(audio(0.4 + 0.3 * i, i)) for i in range(4)]
        bad = EngineRequest(np.full(SR, np.inf, dtype=np.float32))
        outcomes = await asyncio.gather(
            *(worker.transcribe(r) for r in [*requests, bad]), return_exceptions=True
        )
    finally:
        await worker.close()
    *good, failed = outcomes
    assert isinstance(failed, EngineError) and failed.code == "invalid_audio"
    texts = [t.text for t in good if not isinstance(t, BaseException)]
    assert texts == [engine.transcribe([r])[0].text for r in requests]
    assert max(t.batch_size for t in good if not isinstance(t, BaseException)) > 1


def test_model_calls_run_on_one_thread(engine: VoxtralEngine) -> None:
    # CUDA graphs are thread-local: whichever thread calls, the engine uses its own.
    from concurrent.futures import ThreadPoolExecutor

    here = engine._on_thread(threading.get_ident)
    with ThreadPoolExecutor(2) as pool:
        there = {pool.submit(engine._on_thread, threading.get_ident).result() for _ in range(4)}
    assert there == {here} and here != threading.get_ident()


@pytest.mark.skipif(
    os.environ.get("TEST_VOXTRAL_COMPILE") != "1",
    reason="compiling on a CPU takes 20-40 s; set TEST_VOXTRAL_COMPILE=1",
)
def test_compiled_decode_never_recompiles_on_cpu(
    tiny_config: EngineConfig, engine: VoxtralEngine, processor: Any
) -> None:
    from torch._dynamo.utils import counters

    compiled = VoxtralEngine(
        replace(tiny_config, max_batch=2),
        VoxtralOptions(compile=True),
        model=engine._model,
        processor=processor,
    )
    compiled.warmup()
    before = dict(counters["stats"])
    requests = [
        EngineRequest(audio(d, i), language=lang)
        for i, (d, lang) in enumerate([(0.5, None), (3.0, "en"), (7.0, "fr")])
    ]
    compiled_texts = [compiled.transcribe([r])[0].text for r in requests]
    compiled.transcribe(requests[:2])
    assert dict(counters["stats"]) == before
    assert compiled_texts == [engine.transcribe([r])[0].text for r in requests]
