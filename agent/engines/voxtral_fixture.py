"""Voxtral models with random weights, built offline, for tests and benchmarks.

No weights can be downloaded on the machines this project is tested on, yet the Voxtral
engine must be exercised for real. A randomly initialised model runs the same code path
(processor, encoder, projector, decoder, KV cache) and produces random text:

* ``build_tiny_voxtral(path)`` writes a folder that ``engine.model`` can point at: a 1-layer
  model (hidden 16 / 32) that transcribes in well under a second on a CPU.
* ``full_size_voxtral(device, dtype)`` builds the Voxtral Mini 3B shape in memory (bf16 on
  CUDA: ~9.4 GB), which measures GPU speed honestly when the decode length is forced.

Both need a ``tekken.json`` with audio support. mistral-common's wheel ships
``data/tekken_240911.json`` (v3, no audio): setting its version to v7, listing the 1000
special tokens with Voxtral's ids (``[AUDIO]`` 24, ``[BEGIN_AUDIO]`` 25, ``[TRANSCRIBE]`` 34)
and adding an ``audio`` section gives one that loads offline. Only the name ``tekken.json``
is found by ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

AUDIO_TOKEN_ID = 24
BEGIN_AUDIO_TOKEN_ID = 25
TRANSCRIBE_TOKEN_ID = 34
NUM_SPECIAL_TOKENS = 1000

# Voxtral's special tokens by id; the others are "<SPECIAL_n>" placeholders, as in the real file.
_SPECIAL_TOKENS = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    14: "[PREFIX]",
    15: "[MIDDLE]",
    16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]",
    AUDIO_TOKEN_ID: "[AUDIO]",
    BEGIN_AUDIO_TOKEN_ID: "[BEGIN_AUDIO]",
    32: "[ARGS]",
    33: "[CALL_ID]",
    TRANSCRIBE_TOKEN_ID: "[TRANSCRIBE]",
}


def write_tekken_json(folder: Path) -> Path:
    """Write an audio-capable ``tekken.json`` into ``folder`` (from mistral-common's data)."""
    import mistral_common

    source = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    data = json.loads(source.read_text(encoding="utf-8"))
    data["config"]["version"] = "v7"  # the first version whose instruct tokenizer has audio
    data["special_tokens"] = [
        {"rank": i, "token_str": _SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(NUM_SPECIAL_TOKENS)
    ]
    data["audio"] = {
        "sampling_rate": 16_000,
        "frame_rate": 12.5,  # audio tokens per second: 375 per 30 s window
        "chunk_length_s": 30.0,
        "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tekken.json"  # from_pretrained finds this exact name only
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def build_processor(folder: Path) -> Any:
    """A ``VoxtralProcessor`` (Whisper extractor + Tekken tokenizer) saved in ``folder``."""
    from transformers import VoxtralProcessor, WhisperFeatureExtractor
    from transformers.tokenization_mistral_common import MistralCommonBackend

    # transformers leaves these constructors unannotated: go through Any for mypy --strict.
    make_extractor: Any = WhisperFeatureExtractor
    make_processor: Any = VoxtralProcessor
    tokenizer = MistralCommonBackend(write_tekken_json(folder))
    extractor = make_extractor(
        feature_size=128, sampling_rate=16_000, hop_length=160, chunk_length=30, n_fft=400
    )
    processor = make_processor(feature_extractor=extractor, tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return processor


def tiny_config() -> Any:
    """The smallest config the real code accepts (see the constraints below)."""
    from transformers import VoxtralConfig

    return VoxtralConfig(
        audio_config={
            "hidden_size": 16,
            # The projector stacks 4 encoder frames: its input width is 4 × hidden_size.
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            # 3000 frames / stride 2: the encoder checks the mel length against this.
            "max_source_positions": 1500,
        },
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "vocab_size": 131_072,  # Tekken's: every id the tokenizer can emit must exist
            "max_position_embeddings": 4096,
        },
        audio_token_id=AUDIO_TOKEN_ID,
    )


def build_tiny_voxtral(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny random Voxtral (model + processor) into ``path``; return the folder.

    Point ``engine.model`` at the folder. Works offline (``HF_HUB_OFFLINE=1``), ~35 MB, about
    a second to build. The same ``seed`` gives the same weights, hence the same output.
    """
    from transformers import VoxtralForConditionalGeneration

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    build_processor(folder)
    with _seeded(seed):
        model = VoxtralForConditionalGeneration(tiny_config())
    model.save_pretrained(folder)
    return folder


def full_size_config() -> Any:
    """Voxtral Mini 3B's shape: ``VoxtralConfig()``'s defaults plus the audio token id."""
    from transformers import VoxtralConfig

    return VoxtralConfig(audio_token_id=AUDIO_TOKEN_ID)


def full_size_voxtral(
    device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> tuple[Any, Any]:
    """(model, processor) with Voxtral Mini 3B's shape and random weights, in memory.

    The weights are initialised directly on ``device`` in ``dtype`` (4.68 B parameters:
    ~9.4 GB in bf16), which takes seconds on a GPU; saving and reloading them would not.
    """
    from transformers import VoxtralForConditionalGeneration

    model_class: Any = VoxtralForConditionalGeneration
    with _seeded(seed), torch.device(device):
        model = model_class._from_config(
            full_size_config(), dtype=dtype, attn_implementation="sdpa"
        )
    model.eval()
    with tempfile.TemporaryDirectory(prefix="voxtral-processor-") as folder:
        processor = build_processor(Path(folder))
    return model, processor


class _seeded:
    """Fork the global RNG for a block so building a fixture does not disturb the caller's."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._fork: Any = None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self._seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)
