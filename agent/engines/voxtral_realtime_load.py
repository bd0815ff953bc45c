"""Loading Voxtral Realtime: weights from a folder or a hub id, failures that say what to do."""

from __future__ import annotations

from typing import Any

import torch

from agent.engines.voxtral_load import ModelFamily, load_pretrained

DEFAULT_REALTIME_MODEL = "mistralai/Voxtral-Mini-4B-Realtime-2602"


REALTIME = ModelFamily(
    "voxtral_realtime",
    "Voxtral Realtime",
    "VoxtralRealtimeForConditionalGeneration",
    "VoxtralRealtimeProcessor",
    DEFAULT_REALTIME_MODEL,
    "5.23",
    "Voxtral Mini 4B Realtime needs ~9 GB in bf16 plus the streams' caches; lower "
    "engine.max_streams or free the GPU",
)


def load_realtime_model(model_id: str, device: torch.device) -> tuple[Any, Any]:
    """(model, processor) in bf16 on CUDA, fp32 on a CPU; every failure an EngineLoadError."""
    return load_pretrained(REALTIME, model_id, device)
