"""A real aiortc client calls the server over loopback with real Opus and real speech."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from agent.engines.base import Engine, EngineRequest, EngineResult
from agent.transports.webrtc_peer import ImmediateAudioJitterBuffer
from signaling.app import RunningServer, start_server
from tests.conftest import BECKETT_PHRASES, BECKETT_REGIONS, make_config, normalise
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient

COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"
FAILED = "conversation.item.input_audio_transcription.failed"


async def collect(client: RealtimeClient, n: int, timeout: float = 40.0) -> None:
    """Wait until ``n`` completed-or-failed events have arrived."""
    done = 0
    while done < n:
        ev = await client.next_event(timeout=timeout)
        done += ev.type in (COMPLETED, FAILED)


async def test_beckett_six_phrases_with_times(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with RealtimeClient(server.url) as client:
        await client.connect(ArrayAudioTrack(beckett_audio))
        await collect(client, 6)
        types = [r.type for r in client.received]
        assert types[0] == "session.created"  # queued before the channel existed
        completed = client.of_type(COMPLETED)
        assert [normalise(c["transcript"]) for c in completed] == BECKETT_PHRASES
        started = client.of_type("input_audio_buffer.speech_started")
        stopped = client.of_type("input_audio_buffer.speech_stopped")
        assert len(started) == len(stopped) == 6
        for s, e, (ref_start, ref_end) in zip(started, stopped, BECKETT_REGIONS, strict=True):
            assert abs(s["audio_start_ms"] - ref_start * 1000) <= 150, (s, ref_start)
            assert abs(e["audio_end_ms"] - ref_end * 1000) <= 150, (e, ref_end)
        # Per item: started -> stopped -> committed -> completed, chained by previous_item_id.
        previous = None
        for s, c in zip(started, completed, strict=True):
            item = s["item_id"]
            order = [
                r.type
                for r in client.received
                if r.event.get("item_id") == item and r.type != DELTA
            ]
            assert order == [
                "input_audio_buffer.speech_started",
                "input_audio_buffer.speech_stopped",
                "input_audio_buffer.committed",
                COMPLETED,
            ]
            committed = next(
                r.event
                for r in client.received
                if r.type == "input_audio_buffer.committed" and r.event["item_id"] == item
            )
            assert committed["previous_item_id"] == previous
            previous = item
            assert c["item_id"] == item
            assert set(c["timings"]) >= {"speech_end_ms", "vad_ms", "queue_ms", "engine_ms"}
            assert c["timings"]["engine_ms"] > 0
            # Deltas (append-only) spell out the final text, and all precede it.
            item_events = [r for r in client.received if r.event.get("item_id") == item]
            deltas = [r.event["delta"] for r in item_events if r.type == DELTA]
            assert normalise("".join(deltas)) == normalise(c["transcript"])
            assert item_events[-1].type == COMPLETED
        ids = [r.event["event_id"] for r in client.received]
        assert len(ids) == len(set(ids))


async def test_malformed_data_channel_message_gets_error_and_call_goes_on(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with RealtimeClient(server.url) as client:
        await client.connect(ArrayAudioTrack(beckett_audio[: 16000 * 3]))
        client.send_raw("{not json")
        err = await client.next_event("error", timeout=10)
        assert err.event["error"]["code"] == "invalid_json"
        client.send({"type": "response.create"})
        err = await client.next_event("error", timeout=10)
        assert err.event["error"]["code"] == "unknown_event_type"
        # Still alive: a valid update is applied and the speech is still transcribed.
        client.send(
            {"type": "session.update", "session": {"turn_detection": {"silence_duration_ms": 300}}}
        )
        upd = await client.next_event("session.updated", timeout=10)
        assert upd.event["session"]["turn_detection"]["silence_duration_ms"] == 300
        done = await client.next_event(COMPLETED, timeout=30)
        assert normalise(done.event["transcript"]) == "ever tried"


async def test_client_driven_commit(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    async with RealtimeClient(server.url) as client:
        await client.connect(ArrayAudioTrack(beckett_audio[: int(16000 * 1.6)]))
        client.send({"type": "session.update", "session": {"turn_detection": None}})
        upd = await client.next_event("session.updated", timeout=10)
        assert upd.event["session"]["turn_detection"] is None
        await asyncio.sleep(2.0)
        assert not client.of_type("input_audio_buffer.speech_started")
        client.send({"type": "input_audio_buffer.commit"})
        committed = await client.next_event("input_audio_buffer.committed", timeout=10)
        done = await client.next_event(COMPLETED, timeout=30)
        assert done.event["item_id"] == committed.event["item_id"]
        assert "ever tried" in normalise(done.event["transcript"])
        # An empty buffer cannot be committed twice.
        client.send({"type": "input_audio_buffer.clear"})
        await client.next_event("input_audio_buffer.cleared", timeout=10)


async def test_commit_without_speech_is_an_error(server: RunningServer) -> None:
    silence = np.zeros(16000, np.float32)
    async with RealtimeClient(server.url) as client:
        await client.connect(ArrayAudioTrack(silence))
        client.send({"type": "input_audio_buffer.commit"})
        err = await client.next_event("error", timeout=10)
        assert err.event["error"]["code"] == "input_audio_buffer_commit_empty"


class FailOnFailed(Engine):
    """A fake at the engine seam: the real embedded engine, but any utterance whose text
    says "failed" raises, whether it comes as an interim, a speculative or a plain final."""

    name = "fail-on-failed"

    def __init__(self, inner: Engine) -> None:
        self.inner = inner

    def warmup(self) -> None:
        pass

    def transcribe(self, batch: Sequence[EngineRequest]) -> list[EngineResult]:
        results = self.inner.transcribe(batch)
        if any("failed" in normalise(r.text) for r in results):
            raise RuntimeError("simulated engine fault")
        return results


async def test_engine_error_fails_one_item_and_call_goes_on(
    embedded_engine: Engine, beckett_audio: npt.NDArray[np.float32]
) -> None:
    server = await start_server(make_config(), engine=FailOnFailed(embedded_engine))
    try:
        async with RealtimeClient(server.url) as client:
            await client.connect(ArrayAudioTrack(beckett_audio[: int(16000 * 4.6)]))
            await collect(client, 3)
            outcome = [
                (r.type, normalise(r.event.get("transcript", "")))
                for r in client.received
                if r.type in (COMPLETED, FAILED)
            ]
            assert outcome == [
                (COMPLETED, "ever tried"),
                (FAILED, ""),
                (COMPLETED, "no matter"),
            ]
            failed = client.of_type(FAILED)[0]
            assert failed["error"]["code"] == "engine_error"
            assert "simulated engine fault" in failed["error"]["message"]
    finally:
        await server.stop()


async def test_close_mid_utterance_flushes_it_to_the_engine(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    before = server.state.worker.completed
    track = ArrayAudioTrack(beckett_audio)
    async with RealtimeClient(server.url) as client:
        await client.connect(track)
        # Wait for speech to start in "ever failed" (the 2nd phrase, 0.93 s long) ...
        while len(client.of_type("input_audio_buffer.speech_started")) < 2:
            await client.next_event(timeout=10)
        await asyncio.sleep(0.3)  # ... and hang up in its middle
        # Stop sending first, so no later phrase can slip in while the peer closes.
        track.stop()
        # Not ``received[-1]``: the first phrase's deltas may arrive in the same wake-up.
        item = client.of_type("input_audio_buffer.speech_started")[1]["item_id"]
        assert not [
            e for e in client.of_type("input_audio_buffer.speech_stopped") if e["item_id"] == item
        ]
    # The client closed mid-phrase: the server must still transcribe that open utterance.
    for _ in range(100):
        if server.state.worker.completed >= before + 2 and not server.state.calls:
            break
        await asyncio.sleep(0.1)
    assert server.state.worker.completed == before + 2
    assert not server.state.calls


async def test_restart_pc_replaces_the_peer_under_the_same_id(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    import aiohttp

    async with RealtimeClient(server.url) as first:
        await first.connect(ArrayAudioTrack(beckett_audio))
        await first.next_event("input_audio_buffer.speech_started", timeout=10)
        old = server.state.calls[first.pc_id]
        async with RealtimeClient(server.url) as second:
            second.pc.addTransceiver("audio", direction="sendonly")
            second.pc.createDataChannel("oai-events")
            await second.pc.setLocalDescription(await second.pc.createOffer())
            body = {
                "sdp": second.pc.localDescription.sdp,
                "type": "offer",
                "pc_id": first.pc_id,
                "restart_pc": True,
            }
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{server.url}/api/offer", json=body) as resp:
                    assert resp.status == 200
                    answer = await resp.json()
            assert answer["pc_id"] == first.pc_id
            assert old.closed and old.end_reason == "restarted"
            assert old.utterances == 1  # the phrase open at restart was flushed
            new = server.state.calls[first.pc_id]
            assert new is not old and not new.closed


async def test_audio_frames_are_not_held_back(
    server: RunningServer, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """aiortc's default waits for 4 newer frames (80 ms); the server hands frames on at once."""
    async with RealtimeClient(server.url) as client:
        await client.connect(ArrayAudioTrack(beckett_audio[:16000]))
        session = server.state.calls[client.pc_id]
        (receiver,) = [r for r in session.pc.getReceivers() if r._RTCRtpReceiver__kind == "audio"]
        buffer = receiver._RTCRtpReceiver__jitter_buffer
        assert isinstance(buffer, ImmediateAudioJitterBuffer)
        # It really carried the call's audio: speech was heard and transcribed.
        await client.next_event("input_audio_buffer.speech_started", timeout=10)
