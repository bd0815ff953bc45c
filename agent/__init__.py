"""voxtral-rtc's audio-to-text package.

The flow, one module per stage: ``audio_input`` (WebRTC track -> 16 kHz mono) -> ``vad``
(speech probability per 32 ms) -> ``segmenter`` (utterances; ``detector`` joins the two) ->
``engines`` (speech to text, batched by ``engines.worker``) -> ``events`` (OpenAI Realtime
wire format). ``session`` runs one call through all of them; ``config`` types the settings.
"""
