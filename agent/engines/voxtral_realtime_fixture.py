"""Voxtral Realtime models with random weights, built offline, for tests and benchmarks.

No weights can be downloaded where this project is tested, yet the streaming engine must run
for real: a randomly initialised ``VoxtralRealtimeForConditionalGeneration`` exercises the
whole path (streaming processor, causal conv stem, sliding-window encoder, projector, the
time-conditioned decoder) and emits random text.

* ``build_tiny_voxtral_realtime(path)`` writes a folder ``engine.model`` can point at: 2
  encoder and 2 decoder layers, hidden 16 / 32, and sliding windows far shorter than the
  real ones (encoder 40 positions, decoder 24 tokens) so that a few seconds of audio already
  wrap the engine's per-stream rings.
* ``full_size_voxtral_realtime(device, dtype)`` builds Voxtral Mini 4B Realtime's shape in
  memory (≈ 4.4 B parameters; ≈ 8.9 GB in bf16) for the GPU benchmark.

``VoxtralRealtimeConfig`` merges a ``text_config`` dict over the 4 B defaults, so the tiny
config names every size key. Random weights mostly repeat one filler token; two changes
make the output follow the audio: the projector's output is scaled up (audio outweighs the
previous token's embedding) and the special-token rows of the tied embedding are zeroed
(their logits are 0, below the best of 130 000 random text rows, so text tokens win).

The ``tekken.json`` is mistral-common's bundled ``tekken_240911.json`` made a v11 tokenizer
with the streaming special tokens and an ``audio`` section in streaming format.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from agent.engines.voxtral_fixture import _SPECIAL_TOKENS, NUM_SPECIAL_TOKENS, _seeded

#: Ids of the streaming special tokens in the fixture's tokenizer (unused ids of Voxtral's).
STREAMING_PAD_ID = 36
STREAMING_WORD_ID = 37
#: Silence tokens the processor puts before the audio, as the published model does.
LEFT_PAD_TOKENS = 32
DEFAULT_DELAY_MS = 480
#: Projector output scale that lets random audio embeddings outweigh token embeddings.
AUDIO_SCALE = 30.0

_STREAMING_SPECIALS = {
    **_SPECIAL_TOKENS,
    35: "[BEGIN_THINK]",
    STREAMING_PAD_ID: "[STREAMING_PAD]",
    STREAMING_WORD_ID: "[STREAMING_WORD]",
}


def write_streaming_tekken(folder: Path, delay_ms: int = DEFAULT_DELAY_MS) -> Path:
    """Write a streaming-capable ``tekken.json`` (delay ``delay_ms``) into ``folder``."""
    import mistral_common

    source = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    data = json.loads(source.read_text(encoding="utf-8"))
    data["config"]["version"] = "v11"
    data["special_tokens"] = [
        {"rank": i, "token_str": _STREAMING_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(NUM_SPECIAL_TOKENS)
    ]
    data["audio"] = {
        "sampling_rate": 16_000,
        "frame_rate": 12.5,  # one decoder token per 80 ms
        "transcription_format": "streaming",
        "transcription_delay_ms": delay_ms,
        "streaming_look_ahead_ms": 2.5,
        "streaming_look_back_ms": 52.5,
        "streaming_n_left_pad_tokens": LEFT_PAD_TOKENS,
        "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tekken.json"  # from_pretrained finds this exact name only
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def build_processor(folder: Path, delay_ms: int = DEFAULT_DELAY_MS) -> Any:
    """A ``VoxtralRealtimeProcessor`` saved in ``folder``."""
    from transformers import VoxtralRealtimeFeatureExtractor, VoxtralRealtimeProcessor
    from transformers.tokenization_mistral_common import MistralCommonBackend

    make_extractor: Any = VoxtralRealtimeFeatureExtractor
    make_processor: Any = VoxtralRealtimeProcessor
    tokenizer = MistralCommonBackend(write_streaming_tekken(folder, delay_ms))
    extractor = make_extractor(feature_size=128, sampling_rate=16_000, hop_length=160, n_fft=400)
    processor = make_processor(feature_extractor=extractor, tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return processor


def tiny_config() -> Any:
    """Every size key overridden: the dicts merge over the 4 B model's defaults."""
    from transformers import VoxtralRealtimeConfig

    return VoxtralRealtimeConfig(
        audio_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 8,
            "num_mel_bins": 128,
            "max_position_embeddings": 1500,
            "sliding_window": 40,
        },
        text_config={
            "vocab_size": 131_072,  # Tekken's: every id the tokenizer can emit must exist
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 4096,
            "sliding_window": 24,
        },
        default_num_delay_tokens=DEFAULT_DELAY_MS // 80,
    )


def _follow_audio(model: Any) -> None:
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.mul_(AUDIO_SCALE)
        embed = model.model.language_model.embed_tokens.weight
        embed[:NUM_SPECIAL_TOKENS].zero_()  # tied: lm_head's special rows too
        if model.lm_head.weight.data_ptr() != embed.data_ptr():
            model.lm_head.weight[:NUM_SPECIAL_TOKENS].zero_()


def build_tiny_voxtral_realtime(
    path: str | os.PathLike[str], seed: int = 0, delay_ms: int = DEFAULT_DELAY_MS
) -> Path:
    """Write a tiny random Voxtral Realtime (model + processor) into ``path``.

    Works offline (``HF_HUB_OFFLINE=1``), ~35 MB, about a second. The same ``seed`` gives the
    same weights, hence the same output.
    """
    from transformers import VoxtralRealtimeForConditionalGeneration

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    build_processor(folder, delay_ms)
    with _seeded(seed):
        model = VoxtralRealtimeForConditionalGeneration(tiny_config())
    _follow_audio(model)
    model.save_pretrained(folder)
    return folder


def full_size_voxtral_realtime(
    device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> tuple[Any, Any]:
    """(model, processor) with Voxtral Mini 4B Realtime's shape and random weights."""
    from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

    model_class: Any = VoxtralRealtimeForConditionalGeneration
    with _seeded(seed), torch.device(device):
        model = model_class._from_config(
            VoxtralRealtimeConfig(), dtype=dtype, attn_implementation="sdpa"
        )
    _follow_audio(model)
    model.eval()
    with tempfile.TemporaryDirectory(prefix="voxtral-rt-processor-") as folder:
        processor = build_processor(Path(folder))
    return model, processor
