"""The live pipeline end to end on a tiny random Voxtral, loaded by the server itself.

Random weights give random text: this checks the events and their order (and that the
server's own `engine.kind: voxtral` loading path works), not the words.
"""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mistral_common")

from agent.engines.voxtral_fixture import build_tiny_voxtral
from signaling.app import start_server
from tests.conftest import BECKETT, make_config
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient

COMPLETED = "conversation.item.input_audio_transcription.completed"
LIFECYCLE = [
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed",
    COMPLETED,
]


@pytest.fixture(scope="module")
def tiny_voxtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_voxtral(tmp_path_factory.mktemp("voxtral"))


async def test_live_call_on_tiny_voxtral(
    tiny_voxtral: Path, beckett_audio: npt.NDArray[np.float32]
) -> None:
    config = make_config(
        ENGINE__KIND="voxtral", ENGINE__MODEL=str(tiny_voxtral), ENGINE__DEVICE="cpu"
    )
    server = await start_server(config)  # the server's own engine loading code
    try:
        assert server.state.worker is not None
        assert server.state.worker.engine.name.startswith("voxtral")
        async with RealtimeClient(server.url) as client:
            await client.connect(ArrayAudioTrack(beckett_audio[: int(16000 * 3.2)]))
            done = 0
            while done < 2:
                ev = await client.next_event(timeout=60)
                done += ev.type == COMPLETED
                assert not ev.type.endswith(".failed"), ev.event
        started = client.of_type("input_audio_buffer.speech_started")
        assert len(started) == 2
        for s in started:
            order = [
                r.type
                for r in client.received
                if r.event.get("item_id") == s["item_id"] and r.type in LIFECYCLE
            ]
            assert order == LIFECYCLE
        for c in client.of_type(COMPLETED):
            assert isinstance(c["transcript"], str)
            assert c["timings"]["engine_ms"] > 0

        # The same engine serves file transcription over HTTP, unchanged.
        async with aiohttp.ClientSession() as http:
            form = aiohttp.FormData()
            form.add_field("file", BECKETT.read_bytes(), filename="beckett.wav")
            form.add_field("response_format", "verbose_json")
            async with http.post(f"{server.url}/v1/audio/transcriptions", data=form) as resp:
                body = await resp.json()
                assert resp.status == 200, body
        assert isinstance(body["text"], str)
        assert body["segments"] and body["duration"] == pytest.approx(9.96, abs=0.05)
    finally:
        await server.stop()
