"""Loading Voxtral for the engine: device choice, weights, and failures that say what to do.

Every way loading can fail (no PyTorch, no CUDA for ``engine.device: cuda``, a folder without
weights, a hub id that is neither cached nor reachable, not enough GPU memory) becomes an
``EngineLoadError`` whose message names the cause and the fix, so start-up stops with one
readable line instead of a stack trace from deep inside transformers.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from agent.errors import EngineLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "mistralai/Voxtral-Mini-3B-2507"

_P = ParamSpec("_P")
_R = TypeVar("_R")


def check_transformers() -> None:
    """Fail early on a ``transformers`` whose static cache the decode loop cannot drive.

    The loop writes the prefill into ``StaticCache`` layers and moves their fill level
    (``cumulative_length``, a tensor), which is how transformers 5 tracks it; older releases
    track it differently and would decode garbage rather than fail.
    """
    try:
        import transformers
        from transformers.cache_utils import StaticLayer
    except ImportError as exc:
        raise EngineLoadError(
            f"engine.kind voxtral needs transformers ({exc}): pip install 'voxtral-rtc[voxtral]'"
        ) from exc
    if not hasattr(StaticLayer(max_cache_len=1), "cumulative_length"):
        raise EngineLoadError(
            f"transformers {transformers.__version__} is too old for the Voxtral engine "
            "(tested with 5.23): pip install -U 'transformers>=5.23'"
        )


def pick_device(setting: str) -> torch.device:
    """The device for ``engine.device``: ``auto`` takes CUDA when PyTorch sees a GPU."""
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if setting == "cuda":
        raise EngineLoadError(
            f"engine.device is cuda but PyTorch {torch.__version__} sees no CUDA GPU "
            f"(built for CUDA {torch.version.cuda}): install a CUDA build of torch and check "
            "the driver (nvidia-smi), or set engine.device to auto or cpu"
        )
    log.warning("no CUDA GPU: Voxtral runs on the CPU, several seconds per utterance")
    return torch.device("cpu")


@dataclass(frozen=True)
class ModelFamily:
    """What differs between loading Voxtral and Voxtral Realtime: names, and what to say."""

    kind: str  #: the ``engine.kind`` that loads it, for messages
    name: str  #: the model's name in messages
    model_class: str  #: transformers' class names
    processor_class: str
    default_id: str
    needs: str  #: the transformers release it needs
    memory_hint: str  #: what to do about an out-of-memory


VOXTRAL = ModelFamily(
    "voxtral",
    "Voxtral",
    "VoxtralForConditionalGeneration",
    "VoxtralProcessor",
    DEFAULT_MODEL,
    "4.54",
    "Voxtral Mini 3B needs ~10 GB in bf16 plus the KV cache; free the GPU, or set "
    "engine.device: cpu",
)


def load_pretrained(family: ModelFamily, model_id: str, device: torch.device) -> tuple[Any, Any]:
    """(model, processor) from a folder or hub id, bf16 on CUDA and fp32 on a CPU, in eval
    mode; every failure is an EngineLoadError that names the fix."""
    try:
        import transformers

        model_class = getattr(transformers, family.model_class)
        processor_class = getattr(transformers, family.processor_class)
    except (ImportError, AttributeError) as exc:
        raise EngineLoadError(
            f"engine.kind {family.kind} needs transformers >= {family.needs} with "
            f"mistral-common ({exc}): pip install 'voxtral-rtc[voxtral]'"
        ) from exc
    model_id = model_id or family.default_id
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
                f"repository (hf download {family.default_id} --local-dir {model_id})"
            )
        model_id = str(folder)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    # transformers places weights on the GPU while loading only through accelerate; without
    # it they go to RAM first and are moved after (slower start, same result).
    direct = device.type == "cuda" and importlib.util.find_spec("accelerate") is not None
    try:
        processor = processor_class.from_pretrained(model_id)
        model: Any = model_class.from_pretrained(
            model_id,
            dtype=dtype,
            attn_implementation="sdpa",
            device_map=str(device) if direct else None,
            # With the `kernels` package installed (transformers 5.25 requires it) and the
            # weights placed on a GPU, transformers swaps layers for Hugging Face Hub kernels
            # by default: code fetched from the hub at start-up, and a load failure offline
            # (HF_HUB_OFFLINE=1). The engines run PyTorch's own layers.
            use_kernels=False,
        )
        if device.type == "cuda" and not direct:
            model = model.to(device)
    except torch.OutOfMemoryError as exc:
        raise EngineLoadError(
            f"out of GPU memory loading {model_id}: {family.memory_hint}"
        ) from exc
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise EngineLoadError(
            f"cannot load {family.name} from {model_id!r}: {exc}. Download it first "
            f"(hf download {family.default_id}) or set engine.model to a local folder with "
            "config.json, tekken.json and the safetensors weights"
        ) from exc
    model.eval()
    log.info("loaded %s in %.1f s", model_id, time.perf_counter() - started)
    return model, processor


def load_model(model_id: str, device: torch.device) -> tuple[Any, Any]:
    """Voxtral's model and processor (``load_pretrained``), with the GPU's attention kernels."""
    model, processor = load_pretrained(VOXTRAL, model_id, device)
    if device.type == "cuda":
        # Flash for the encoder (no mask), memory-efficient for the padded decoder.
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
    return model, processor


def static_cache(model: Any, batch_size: int, max_cache_len: int) -> Any:
    """A ``StaticCache`` for ``batch_size`` rows, allocated now on the model's device.

    Allocating up front (not on first write) puts an out-of-memory at warm-up, and gives the
    tensors fixed addresses that the compiled step and its CUDA graph can rely on.
    """
    from transformers import StaticCache

    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    cache.early_initialization(
        batch_size, text.num_key_value_heads, head_dim, model.dtype, model.device
    )
    return cache


def compile_step(step: Callable[_P, _R], mode: str, graphs: int) -> Callable[_P, _R]:
    """``torch.compile`` the decode step with static shapes, room for ``graphs`` graphs."""
    # One graph per bucket: past dynamo's recompile limit (8 by default) it would silently
    # run eager. The attribute was renamed in torch 2.6.
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(getattr(dynamo, name), 2 * graphs + 4))
    compiled: Callable[_P, _R] = torch.compile(step, mode=mode, dynamic=False)
    return compiled


def cudagraph_thread_state() -> None:
    """Set up the calling thread's CUDA-graph state, which torch < 2.13 leaves out.

    ``torch.compile(mode="reduce-overhead")`` keeps its CUDA-graph trees in thread-local
    state. Before 2.13, PyTorch creates that state only on the thread that first imports
    ``torch._inductor.cudagraph_trees`` (and on autograd's own threads). On any other thread,
    the first replay fails with a bare ``AssertionError`` in ``cudagraph_trees.get_obj``
    (pytorch/pytorch#123177; 2.13 creates the state lazily per thread). With torch 2.11 on
    an H200, that failed the warm-up of a second engine in one process. Here the engine's
    thread creates its own state, as 2.13 would. Nothing changes where the state exists.
    """
    from torch._inductor import cudagraph_trees

    local = getattr(cudagraph_trees, "local", None)
    if local is None or hasattr(local, "tree_manager_containers"):
        return
    # Python-level state only, as torch 2.13 reads it first. (torch also copies it into its
    # C++ thread-local state for autograd's threads; inference needs none, and an object
    # left there was seen to abort the interpreter at exit once its thread had ended.)
    local.tree_manager_containers = {}
    local.tree_manager_locks = defaultdict(threading.Lock)
