"""The Python client's view of a call: what counts as an utterance."""

from __future__ import annotations

from signaling.client import COMPLETED, ReceivedEvent, utterances


def test_an_empty_final_is_no_utterance() -> None:
    def completed(item: str, transcript: str | None) -> ReceivedEvent:
        event = {"type": COMPLETED, "item_id": item, "content_index": 0}
        if transcript is not None:
            event["transcript"] = transcript
        return ReceivedEvent(event, 0.0)

    received = [
        ReceivedEvent({"type": "input_audio_buffer.speech_started", "item_id": "a"}, 0.0),
        completed("a", ""),  # a click the VAD took for speech
        completed("b", "Ever tried."),
        completed("c", "  \n"),
        completed("d", None),
        ReceivedEvent({"type": "conversation.item.input_audio_transcription.delta"}, 0.0),
        completed("e", "Ever failed."),
    ]
    assert [e["item_id"] for e in utterances(received)] == ["b", "e"]
