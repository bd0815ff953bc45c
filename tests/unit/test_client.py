"""The Python client apart from the server: what it imports, and what counts as an utterance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from voxtral_rtc_client import COMPLETED, ReceivedEvent, utterances

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_SIDE = ("agent", "signaling", "faster_whisper", "onnxruntime", "torch", "transformers")


def test_the_client_package_imports_nothing_of_the_server() -> None:
    """A fresh interpreter imports every module of the client: none of the server's packages
    nor its models' runtimes come with it."""
    code = (
        "import json, sys\n"
        "import voxtral_rtc_client, voxtral_rtc_client.audio, voxtral_rtc_client.text\n"
        "import voxtral_rtc_client.twilio, voxtral_rtc_client.webrtc\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    modules = json.loads(out.stdout)
    assert "aiortc" in modules and "voxtral_rtc_client.webrtc" in modules  # it did import
    loaded = [m for m in modules if m.split(".")[0] in SERVER_SIDE]
    assert not loaded, loaded


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
