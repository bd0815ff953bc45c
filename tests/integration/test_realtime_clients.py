"""The real client packages, unchanged, against the real server's ``/v1/realtime``.

Each test starts the server in-process on 127.0.0.1 (embedded engine, bearer auth on) and
runs one driver from ``tests/clients/`` with its framework's own virtualenv
(``.venvs/openai``, ``.venvs/livekit``, ``.venvs/pipecat``; made by
``scripts/client_venvs.sh``, which the README's test command runs). A driver uses only the
client package, pointed at the server by a base URL and a token, streams
``beckett.wav`` in real time and prints one JSON line per thing it received; the test
reads those lines. The drivers never import the project and contact no other address.
"""

from __future__ import annotations

import asyncio
import json
import os
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.engines.base import Engine
from signaling.app import RunningServer, start_server
from tests.conftest import BECKETT, BECKETT_PHRASES, BECKETT_REGIONS, make_config, normalise

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "tests" / "clients"
VENVS = ROOT / ".venvs"
TOKEN = "client-test-token-0123456789abcdef"
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"
#: Whole-process limit for one driver run (the audio itself takes ~11.5 s).
DRIVER_TIMEOUT_S = 120.0


def heard(text: str) -> str:
    """Normalised, with tiny.en's usual mishearing of "fail" as "bail" forgiven."""
    return " ".join("fail" if w == "bail" else w for w in normalise(text).split())


def assert_phrases(texts: list[str]) -> None:
    """One text per phrase, in order, each containing its phrase."""
    got = [heard(t) for t in texts]
    assert len(got) == len(BECKETT_PHRASES), got
    for phrase, text in zip(BECKETT_PHRASES, got, strict=True):
        assert phrase in text, (phrase, got)


@dataclass
class DriverRun:
    rc: int
    records: list[dict[str, Any]]
    stderr: str
    stdout: str = field(repr=False, default="")

    def driver(self, what: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("driver") == what]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """openai drivers: the server events, as the SDK parsed them."""
        out = [r["event"] for r in self.records if "event" in r and isinstance(r["event"], dict)]
        return [e for e in out if kind is None or e.get("type") == kind]

    def report(self) -> str:
        return f"rc={self.rc}\n--- stdout\n{self.stdout[-6000:]}\n--- stderr\n{self.stderr[-6000:]}"


def venv_python(name: str) -> Path:
    python = VENVS / name / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"{python} is missing: run the README's test command (bash scripts/test.sh), "
            f"which creates the client virtualenvs (bash scripts/client_venvs.sh)."
        )
    return python


def driver_env() -> dict[str, str]:
    """The environment minus anything that could send a client elsewhere or load the project."""
    drop = ("PROXY", "OPENAI_", "LIVEKIT_", "OTEL_", "PYTHONPATH", "PYTHONHOME", "SSL_CERT")
    env = {k: v for k, v in os.environ.items() if not any(d in k.upper() for d in drop)}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    # onnxruntime (Pipecat's Silero) otherwise looks up mobile.events.data.microsoft.com.
    env["ORT_DISABLE_TELEMETRY"] = "1"
    return env


async def run_driver(
    venv: str, script: str, server: RunningServer, *args: str, wav: Path = BECKETT
) -> DriverRun:
    python = venv_python(venv)
    proc = await asyncio.create_subprocess_exec(
        str(python),
        str(CLIENTS / script),
        "--base-url",
        server.url,
        "--wav",
        str(wav),
        *args,
        cwd=ROOT,
        env=driver_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DRIVER_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(f"{script} {args} ran past {DRIVER_TIMEOUT_S} s\n{err.decode()[-4000:]}")
    stdout = out.decode(errors="replace")
    records = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    assert proc.returncode is not None
    return DriverRun(proc.returncode, records, err.decode(errors="replace"), stdout)


@pytest.fixture
async def auth_server(embedded_engine: Engine) -> AsyncIterator[RunningServer]:
    server = await start_server(
        make_config(SERVER__AUTH_TOKENS=f"[{TOKEN}]"), engine=embedded_engine
    )
    try:
        assert server.host == "127.0.0.1"
        yield server
    finally:
        await server.stop()


def check_openai_items(run: DriverRun, *, server_vad: bool) -> list[dict[str, Any]]:
    """What any OpenAI Realtime transcription client relies on; returns the completed events."""
    assert run.rc == 0, run.report()
    events = run.events()
    assert events, run.report()
    first = events[0]
    assert first["type"] == "session.created", events[:3]
    assert first["session"]["type"] == "transcription", first
    assert not run.events("error"), run.events("error")
    assert not run.events("conversation.item.input_audio_transcription.failed")

    completed = run.events(COMPLETED)
    assert_phrases([c["transcript"] for c in completed])
    for c in completed:
        assert c["item_id"] and c["content_index"] == 0, c
        usage = c["usage"]
        assert usage["type"] == "duration", c
        assert 0 < usage["seconds"] <= 12, c

    # Every item was committed before its transcript; deltas belong to a known item and
    # come before its completed.
    order = {id(e): i for i, e in enumerate(events)}
    committed = {e["item_id"]: order[id(e)] for e in run.events("input_audio_buffer.committed")}
    done_at = {c["item_id"]: order[id(c)] for c in completed}
    assert set(done_at) <= set(committed), (done_at, committed)
    assert all(committed[i] < done_at[i] for i in done_at)
    deltas = run.events(DELTA)
    assert deltas, "no delta events"
    for d in deltas:
        assert isinstance(d["delta"], str) and d["item_id"] in done_at, d
        assert order[id(d)] < done_at[d["item_id"]], d

    started = run.events("input_audio_buffer.speech_started")
    stopped = run.events("input_audio_buffer.speech_stopped")
    if server_vad:
        assert len(started) == len(stopped) == len(BECKETT_PHRASES), (started, stopped)
        assert {e["item_id"] for e in started} == set(done_at)
    else:
        # turn_detection null: the client decides the turns; the server does not endpoint.
        assert not started and not stopped, (started, stopped)
    return completed


# --- openai SDK, GA realtime client ------------------------------------------------------


async def test_openai_ga_server_vad(auth_server: RunningServer) -> None:
    run = await run_driver("openai", "openai_ga.py", auth_server, "--token", TOKEN)
    completed = check_openai_items(run, server_vad=True)
    updated = run.events("session.updated")
    assert updated and updated[0]["session"]["type"] == "transcription", updated
    # The SDK parsed the events into its own models and read the fields apps read.
    done = [r for r in run.records if r.get("event", {}).get("type") == COMPLETED]
    assert [r["sdk_class"] for r in done] == [
        "ConversationItemInputAudioTranscriptionCompletedEvent"
    ] * len(completed)
    assert {r["sdk_usage_type"] for r in done} == {"duration"}
    assert [r["sdk_transcript"] for r in done] == [c["transcript"] for c in completed]


async def test_openai_ga_pcmu_client_commits(auth_server: RunningServer) -> None:
    """G.711 mu-law at 8 kHz, ``turn_detection: null``: the app commits in each pause.
    Also ``?model=`` on the URL, ``include`` logprobs and ``noise_reduction``, all accepted."""
    gaps = [BECKETT_REGIONS[k][1] for k in range(len(BECKETT_REGIONS))]
    nexts = [BECKETT_REGIONS[k + 1][0] for k in range(len(BECKETT_REGIONS) - 1)] + [9.96]
    commit_at = ",".join(f"{(a + b) / 2:.2f}" for a, b in zip(gaps, nexts, strict=True))
    run = await run_driver(
        "openai",
        "openai_ga.py",
        auth_server,
        "--token",
        TOKEN,
        "--format",
        "pcmu",
        "--turn-detection",
        "none",
        "--commit-at",
        commit_at,
        "--model-in-url",
        "--include-logprobs",
        "--noise-reduction",
        "near_field",
    )
    check_openai_items(run, server_vad=False)
    assert len(run.driver("commit")) == len(BECKETT_PHRASES)
    session = run.events("session.updated")[0]["session"]
    assert session["type"] == "transcription"
    assert session["audio"]["input"]["format"]["type"] == "audio/pcmu", session
    assert session["audio"]["input"]["turn_detection"] is None, session


async def test_openai_ga_wrong_token_is_401(auth_server: RunningServer) -> None:
    run = await run_driver("openai", "openai_ga.py", auth_server, "--token", "not-the-token-0123")
    assert run.rc == 2, run.report()
    (error,) = run.driver("error")
    assert error["status"] == 401, error
    assert not run.events()


# --- openai SDK, beta realtime client ----------------------------------------------------


async def test_openai_beta_transcription_session(auth_server: RunningServer) -> None:
    run = await run_driver("openai", "openai_beta.py", auth_server, "--token", TOKEN)
    check_openai_items(run, server_vad=True)
    updated = run.events("transcription_session.updated")
    assert len(updated) == 1, run.report()
    assert not run.events("session.updated")


# --- LiveKit Agents, livekit-plugins-openai ----------------------------------------------


def write_wav(path: Path, audio: npt.NDArray[np.float32]) -> Path:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return path


async def test_livekit_realtime_stt(
    auth_server: RunningServer, beckett_audio: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    """Beckett's six phrases, then ~6 s of them without a pause: six finals with the
    phrases, and interim text while the seventh, long utterance is still being spoken."""
    pieces = [beckett_audio[int(a * 16000) : int(b * 16000)] for a, b in BECKETT_REGIONS]
    long_utterance: list[npt.NDArray[np.float32]] = []
    while sum(len(p) for p in long_utterance) < 6 * 16000:
        long_utterance.extend(pieces)
    wav = write_wav(tmp_path / "speech.wav", np.concatenate([beckett_audio, *long_utterance]))
    run = await run_driver(
        "livekit", "livekit_stt.py", auth_server, "--token", TOKEN, "--expect", "7", wav=wav
    )
    assert run.rc == 0, run.report()
    kinds = [r.get("event") for r in run.records]
    finals = [r for r in run.records if r.get("event") == "FINAL_TRANSCRIPT"]
    assert len(finals) == 7, run.report()
    assert_phrases([f["text"] for f in finals[:6]])
    spoken = set(" ".join(BECKETT_PHRASES).split())
    assert sum(w in spoken for w in heard(finals[6]["text"]).split()) >= 5, finals[6]
    # Server VAD drives the plugin's speech events.
    assert kinds.count("START_OF_SPEECH") >= 7 and kinds.count("END_OF_SPEECH") >= 7, kinds
    # Interim text of the long utterance before the server saw its end.
    sixth = run.records.index(finals[5])
    end = kinds.index("END_OF_SPEECH", sixth + 1)
    interims = [r for r in run.records[sixth:end] if r.get("event") == "INTERIM_TRANSCRIPT"]
    assert interims, run.report()
    assert any(w in spoken for i in interims for w in heard(i["text"]).split()), interims


async def test_livekit_file_stt(auth_server: RunningServer) -> None:
    run = await run_driver("livekit", "livekit_stt.py", auth_server, "--token", TOKEN, "--file")
    assert run.rc == 0, run.report()
    (final,) = [r for r in run.records if r.get("event") == "FINAL_TRANSCRIPT"]
    text = heard(final["text"])
    for phrase in BECKETT_PHRASES:
        assert phrase in text, text


# --- Pipecat ------------------------------------------------------------------------------


def pipecat_finals(run: DriverRun) -> list[str]:
    assert run.rc == 0, run.report()
    assert not [r for r in run.records if r.get("frame") == "ErrorFrame"], run.report()
    return [r["text"] for r in run.records if r.get("frame") == "TranscriptionFrame"]


async def test_pipecat_realtime_local_vad(auth_server: RunningServer) -> None:
    """Pipecat's default: ``turn_detection: null``, a commit at each local VAD stop."""
    run = await run_driver("pipecat", "pipecat_stt.py", auth_server, "--token", TOKEN)
    assert_phrases(pipecat_finals(run))
    frames = [r.get("frame") for r in run.records]
    assert frames.count("VADUserStoppedSpeakingFrame") >= len(BECKETT_PHRASES)
    # turn_detection null: no server VAD, so no proposed turns from the service.
    assert "ProposedUserStartedSpeakingFrame" not in frames


async def test_pipecat_realtime_server_vad(auth_server: RunningServer) -> None:
    run = await run_driver(
        "pipecat", "pipecat_stt.py", auth_server, "--token", TOKEN, "--mode", "realtime-server-vad"
    )
    assert_phrases(pipecat_finals(run))
    frames = [r.get("frame") for r in run.records]
    assert frames.count("ProposedUserStartedSpeakingFrame") == len(BECKETT_PHRASES), frames
    assert "InterimTranscriptionFrame" in frames


async def test_pipecat_openai_stt_service(auth_server: RunningServer) -> None:
    """``OpenAISTTService``: local VAD segments posted to ``/v1/audio/transcriptions``."""
    run = await run_driver(
        "pipecat", "pipecat_stt.py", auth_server, "--token", TOKEN, "--mode", "file"
    )
    assert_phrases(pipecat_finals(run))
