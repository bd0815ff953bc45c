"""Loading Voxtral Realtime: weights from a folder or a hub id, failures that say what to do."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import torch

from agent.errors import EngineLoadError

log = logging.getLogger(__name__)

DEFAULT_REALTIME_MODEL = "mistralai/Voxtral-Mini-4B-Realtime-2602"


def load_realtime_model(model_id: str, device: torch.device) -> tuple[Any, Any]:
    """(model, processor) in bf16 on CUDA, fp32 on a CPU; every failure an EngineLoadError."""
    try:
        from transformers import VoxtralRealtimeForConditionalGeneration, VoxtralRealtimeProcessor
    except ImportError as exc:
        raise EngineLoadError(
            f"engine.kind voxtral_realtime needs transformers >= 5.23 with mistral-common "
            f"({exc}): pip install 'voxtral-rtc[voxtral]'"
        ) from exc
    model_id = model_id or DEFAULT_REALTIME_MODEL
    folder = Path(model_id).expanduser()
    if folder.exists() or model_id.startswith(("/", ".", "~")):
        if not folder.is_dir():
            raise EngineLoadError(f"engine.model {model_id}: no such folder")
        missing = [n for n in ("config.json", "tekken.json") if not (folder / n).is_file()]
        if not any(folder.glob("*.safetensors")):
            missing.append("*.safetensors weights")
        if missing:
            raise EngineLoadError(
                f"engine.model {model_id} lacks {', '.join(missing)}: download the whole "
                f"repository (hf download {DEFAULT_REALTIME_MODEL} --local-dir {model_id})"
            )
        model_id = str(folder)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    direct = device.type == "cuda" and importlib.util.find_spec("accelerate") is not None
    started = time.perf_counter()
    try:
        processor = VoxtralRealtimeProcessor.from_pretrained(model_id)
        model: Any = VoxtralRealtimeForConditionalGeneration.from_pretrained(
            model_id,
            dtype=dtype,
            attn_implementation="sdpa",
            device_map=str(device) if direct else None,
            use_kernels=False,  # no code fetched from the hub at start-up (see voxtral_load)
        )
        if not direct:
            model = model.to(device)
    except torch.OutOfMemoryError as exc:
        raise EngineLoadError(
            f"out of GPU memory loading {model_id}: Voxtral Mini 4B Realtime needs ~9 GB in "
            "bf16 plus the streams' caches; lower engine.max_streams or free the GPU"
        ) from exc
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise EngineLoadError(
            f"cannot load Voxtral Realtime from {model_id!r}: {exc}. Download it first "
            f"(hf download {DEFAULT_REALTIME_MODEL}) or set engine.model to a local folder "
            "with config.json, tekken.json and the safetensors weights"
        ) from exc
    model.eval()
    log.info("loaded %s in %.1f s", model_id, time.perf_counter() - started)
    return model, processor
