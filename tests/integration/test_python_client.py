"""The Python client (``voxtral_rtc_client``) against a real server: an empty final is no
utterance."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.engines.base import Engine
from signaling.app import start_server
from tests.conftest import BECKETT_PHRASES, make_config, normalise
from tests.support.sounds import clicks
from tests.support.wire import problems
from voxtral_rtc_client import COMPLETED, ArrayAudioTrack, RealtimeClient

FAILED = "conversation.item.input_audio_transcription.failed"


async def test_clicks_complete_empty_and_are_no_utterance(
    embedded_engine: Engine, beckett_audio: npt.NDArray[np.float32]
) -> None:
    # The energy VAD takes the clicks for speech, as Silero does a real breath or click.
    server = await start_server(make_config(VAD__KIND="energy"), engine=embedded_engine)
    audio = np.concatenate([clicks(), np.zeros(24_000, np.float32), beckett_audio])
    try:
        async with RealtimeClient(server.url) as client:
            await client.connect(ArrayAudioTrack(audio))
            done = 0
            while done < 7:
                done += (await client.next_event(timeout=60)).type in (COMPLETED, FAILED)
            completed = client.of_type(COMPLETED)
            first = client.of_type("input_audio_buffer.speech_started")[0]
            assert completed[0]["item_id"] == first["item_id"]
            assert completed[0]["transcript"].strip() == ""  # the server closes the item
            said = client.utterances()
            assert [normalise(u["transcript"]) for u in said] == BECKETT_PHRASES
            assert [u["item_id"] for u in said] == [c["item_id"] for c in completed[1:]]
            # Everything the server really sent is what the event types say.
            assert [p for r in client.received for p in problems(r.event)] == []
    finally:
        await server.stop()
