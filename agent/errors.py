"""The project's exceptions: each carries a stable ``code`` that reaches the wire unchanged."""

from __future__ import annotations


class VoxtralRtcError(Exception):
    """Base of every error this project raises on purpose."""

    code = "internal_error"
    type = "server_error"


class ConfigError(VoxtralRtcError):
    """The configuration is invalid; the message names the key."""

    code = "invalid_config"


class ProtocolError(VoxtralRtcError):
    """A client message that cannot be understood (bad JSON, unknown type, bad field)."""

    type = "invalid_request_error"

    def __init__(self, message: str, code: str = "invalid_event") -> None:
        super().__init__(message)
        self.code = code


class EngineError(VoxtralRtcError):
    """Transcribing one utterance failed; the call goes on."""

    code = "engine_error"

    def __init__(self, message: str, code: str = "engine_error") -> None:
        super().__init__(message)
        self.code = code


class EngineLoadError(VoxtralRtcError):
    """The engine could not be loaded; the message names the cause and the fix."""

    code = "engine_load_failed"


class AudioInputError(VoxtralRtcError):
    """Audio handed in for file transcription cannot be used; the message says why.

    ``code`` is one of ``invalid_audio`` (undecodable), ``empty_audio``, ``file_too_large``,
    ``audio_too_long``, ``invalid_url``, ``url_not_allowed`` or ``url_fetch_failed``; the
    HTTP layer maps it to a status (413 for the size limits, 400 otherwise).
    """

    type = "invalid_request_error"

    def __init__(self, message: str, code: str = "invalid_audio") -> None:
        super().__init__(message)
        self.code = code
