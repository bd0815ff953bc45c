"""The TwiML ``POST /v1/twilio/voice`` answers: fork the call's audio here, then carry on.

``<Start><Stream>`` forks the call's audio to the media stream one way (``both_tracks``: the
caller and what the call plays or the callee says, each transcribed on its own) while the
rest of the TwiML runs: ``telephony.twiml_after_start`` (a ``<Dial>``, a ``<Pause>``...),
which the config check has already found well-formed. ``<Stream>`` URLs may carry no query
string, so values reach the stream as ``<Parameter>``s.
"""

from __future__ import annotations

from collections.abc import Mapping
from xml.sax.saxutils import quoteattr

CONTENT_TYPE = "application/xml"


def start_stream(stream_url: str, after: str, parameters: Mapping[str, str]) -> str:
    """``<Response><Start><Stream url=... track="both_tracks">...</Start>{after}</Response>``."""
    params = "".join(
        f"<Parameter name={quoteattr(name)} value={quoteattr(value)}/>"
        for name, value in parameters.items()
    )
    stream = f'<Stream url={quoteattr(stream_url)} track="both_tracks">{params}</Stream>'
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Start>{stream}</Start>{after}</Response>"
    )
