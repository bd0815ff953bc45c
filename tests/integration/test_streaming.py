"""Words while speaking: deltas during a long utterance, none when interims are off."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.engines.base import Engine
from signaling.app import start_server
from tests.conftest import BECKETT_PHRASES, BECKETT_REGIONS, make_config, normalise
from tests.support.engine_gate import CountingEngine, EngineGatedTrack, server_settled
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient
from voxtral_rtc_client.audio import without_pauses

DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
STARTED = "input_audio_buffer.speech_started"


def phrases_without_pauses(beckett: npt.NDArray[np.float32], seconds: float) -> np.ndarray:
    """The six phrases cut at their speech regions and joined back to back until ``seconds``."""
    return without_pauses(beckett, BECKETT_REGIONS, seconds)


async def test_long_utterance_streams_append_only_deltas(
    embedded_engine: Engine, beckett_audio: npt.NDArray[np.float32]
) -> None:
    audio = phrases_without_pauses(beckett_audio, 20.0)
    engine = CountingEngine(embedded_engine)
    # The gate may hold the audio for seconds on a loaded box: not an idle caller. Interims
    # are spaced by their own measured engine time by default (``engine.interim_share``), so
    # how many a turn gets depends on the machine's speed (CI boxes saw 4 early deltas or
    # 5, the same code): with no bound one is due every interval of audio, and the gate has
    # each decoded before more audio comes (13-14 early deltas, on AVX2 and AVX512 alike).
    config = make_config(AUDIO__IDLE_TIMEOUT_S="120", ENGINE__INTERIM_SHARE="0")
    server = await start_server(config, engine=engine)
    try:
        async with RealtimeClient(server.url) as client:
            # Every interim the server schedules is decoded before more audio comes, so
            # the number of deltas does not depend on how busy this machine is today.
            track = EngineGatedTrack(audio, server_settled(server, engine))
            await client.connect(track)
            # Generous: the gates wait for the engine, however slow the box is today.
            done = await client.next_event(COMPLETED, timeout=900)
            assert track.gates >= 80  # a gate every 250 ms through the 20 s of speech
            kinds = [r.type for r in client.received]
            item = done.event["item_id"]
            # One utterance, no pause: speech_stopped only at the very end.
            assert kinds.count("input_audio_buffer.speech_started") == 1
            stop_at = kinds.index("input_audio_buffer.speech_stopped")
            deltas = [r for r in client.received if r.type == DELTA]
            assert all(d.event["item_id"] == item for d in deltas)
            # Words arrived while the person was still talking, many times over.
            early = [d for d in deltas if client.received.index(d) < stop_at]
            assert len(early) >= 5, kinds
            streamed = normalise("".join(d.event["delta"] for d in deltas))
            final = normalise(done.event["transcript"])
            # Append-only deltas are consistent with the authoritative final: what was
            # streamed is the final's beginning (the final then completes it). On 20 s
            # without a pause tiny.en's final ends in a loop ("... bail again bail again"),
            # which the streamed words never contain: 0.795 of them are in the final, in
            # order (measured with every interim decoded), so 0.7 and not "all".
            assert final.startswith(streamed) or share_in_order(streamed, final) >= 0.7, (
                streamed,
                final,
            )
            # And they are the words spoken, not noise (tiny.en hears "fail" as "bail").
            spoken = set(normalise(" ".join(BECKETT_PHRASES)).split())
            heard = streamed.split()
            assert sum(w in spoken for w in heard) >= 0.75 * len(heard), streamed
            assert len(final.split()) >= 25  # ~30 words spoken
    finally:
        await server.stop()


def share_in_order(streamed: str, final: str) -> float:
    """Share of streamed words found in order in the final (tiny.en may re-punctuate, or
    mishear a word in one decode and not the other): their longest common subsequence."""
    a, b = streamed.split(), final.split()
    row = [0] * (len(b) + 1)
    for w in a:
        diag = 0
        for j, v in enumerate(b, 1):
            diag, row[j] = row[j], diag + 1 if w == v else max(row[j], row[j - 1])
    return row[-1] / max(len(a), 1)


async def test_interims_off_means_no_deltas(
    embedded_engine: Engine, beckett_audio: npt.NDArray[np.float32]
) -> None:
    server = await start_server(
        make_config(ENGINE__INTERIM_INTERVAL_MS="0"), engine=embedded_engine
    )
    try:
        async with RealtimeClient(server.url) as client:
            await client.connect(ArrayAudioTrack(beckett_audio[: 16000 * 3]))
            await client.next_event(COMPLETED, timeout=30)
            await client.next_event(COMPLETED, timeout=30)
            assert not client.of_type(DELTA)
            assert server.state.worker is not None
            assert server.state.worker.completed_interims == 0
    finally:
        await server.stop()


async def test_interim_event_extension(
    server: object, beckett_audio: npt.NDArray[np.float32]
) -> None:
    from signaling.app import RunningServer

    assert isinstance(server, RunningServer)
    async with RealtimeClient(server.url) as client:
        # Long enough speech that an interim returns while the item is still open.
        await client.connect(ArrayAudioTrack(phrases_without_pauses(beckett_audio, 6.0)))
        client.send({"type": "session.update", "session": {"include_interim": True}})
        upd = await client.next_event("session.updated", timeout=10)
        assert upd.event["session"]["include_interim"] is True
        interim = await client.next_event(
            "conversation.item.input_audio_transcription.interim", timeout=30
        )
        # A guess at the open item's words: some of beckett's, before the item's final.
        words = set(normalise(interim.event["text"]).split())
        assert words & set(" ".join(BECKETT_PHRASES).split()), interim.event
        before = client.received[: client.received.index(interim)]
        item_id = interim.event["item_id"]
        assert item_id in {r.event["item_id"] for r in before if r.type == STARTED}
        assert item_id not in {r.event["item_id"] for r in before if r.type == COMPLETED}
