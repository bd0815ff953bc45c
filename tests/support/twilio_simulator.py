"""A Twilio Media Stream as Twilio sends it (``voxtral_rtc_client.twilio``), and Twilio's
request signatures made with the real ``twilio`` package."""

from __future__ import annotations

from collections.abc import Mapping

from twilio.request_validator import RequestValidator

from voxtral_rtc_client.twilio import (
    CHUNK_BYTES,
    CHUNK_MS,
    MULAW_FORMAT,
    MULAW_SILENCE,
    TwilioStream,
    mulaw_8k,
    sid,
    silence,
)

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_MS",
    "MULAW_FORMAT",
    "MULAW_SILENCE",
    "TwilioStream",
    "mulaw_8k",
    "sid",
    "sign",
    "silence",
]


def sign(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """``X-Twilio-Signature`` as Twilio computes it (the ``twilio`` package's own code)."""
    return str(RequestValidator(auth_token).compute_signature(url, dict(params or {})))
