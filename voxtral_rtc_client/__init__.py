"""A Python client of a voxtral-rtc server, apart from the server: it needs aiortc, aiohttp,
PyAV and numpy, never the server's packages (``agent``, ``signaling``) or its models.

``webrtc``: a call over WebRTC (``RealtimeClient``, ``ArrayAudioTrack``); ``twilio``: a
Twilio Media Stream sender; ``audio``: files in and out; ``text``: transcripts compared.
"""

from voxtral_rtc_client.audio import read_audio, wav_bytes
from voxtral_rtc_client.text import normalise
from voxtral_rtc_client.webrtc import (
    COMPLETED,
    FRAME_MS,
    ArrayAudioTrack,
    RealtimeClient,
    ReceivedEvent,
    utterances,
)

__all__ = [
    "COMPLETED",
    "FRAME_MS",
    "ArrayAudioTrack",
    "RealtimeClient",
    "ReceivedEvent",
    "normalise",
    "read_audio",
    "utterances",
    "wav_bytes",
]
