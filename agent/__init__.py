"""voxtral-rtc's audio-to-text package.

The flow, one module per stage: ``transports`` (a WebRTC peer or an OpenAI Realtime
WebSocket, each feeding one ordered inbound queue) -> ``session`` (transport-free: runs one
caller through every stage) -> ``vad`` (speech probability per 32 ms) -> ``segmenter``
(utterances; ``detector`` joins the two) -> ``items`` (deltas, speculative final) ->
``engines`` (speech to text, batched by ``engines.worker``) -> ``events`` (OpenAI Realtime
wire format). ``config`` types the settings.
"""

import os

# onnxruntime (the Silero VAD) sends usage telemetry unless told not to: a DNS lookup of
# mobile.events.data.microsoft.com some seconds into a process that runs a session, from
# every deployment and test run. It reads this variable when it loads, so it is set before
# anything here can import it; an operator's own setting wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
