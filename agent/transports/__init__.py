"""Transports: each carries ``agent.session.TranscriptionSession``s to and from clients.

``webrtc``: an aiortc peer (Opus track in, ``oai-events`` data channel both ways), with
``webrtc_audio`` (track -> 16 kHz chunks) and ``webrtc_peer`` (aiortc/aioice quirks).
``websocket``: an OpenAI Realtime WebSocket (``/v1/realtime``: base64 audio and events).
"""
