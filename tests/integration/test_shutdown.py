"""SIGTERM on ``voxtral-rtc serve``: new calls get 503, the open utterance of a live call is
still transcribed and delivered, and the process exits 0 within its grace period."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import yaml

from agent.config import ENV_PREFIX
from agent.transports.webrtc_peer import restrict_host_addresses
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient

REPO = Path(__file__).resolve().parents[2]
GRACE_S = 5.0
COMPLETED = "conversation.item.input_audio_transcription.completed"


async def read_logs(stream: asyncio.StreamReader, into: list[dict[str, Any]]) -> None:
    while line := await stream.readline():
        with contextlib.suppress(ValueError):
            into.append(json.loads(line))


async def test_sigterm_finishes_open_utterances_then_exits_zero(
    tmp_path: Path, beckett_audio: npt.NDArray[np.float32]
) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": GRACE_S},
                "webrtc": {"host_addresses": ["127.0.0.1"]},
                "logging": {"format": "json"},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "signaling.cli", "serve", "--config", str(config)),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    logs: list[dict[str, Any]] = []
    assert proc.stderr is not None
    reader = asyncio.create_task(read_logs(proc.stderr, logs))
    restrict_host_addresses(["127.0.0.1"])  # this process's client peer: loopback only
    client: RealtimeClient | None = None
    try:
        url = ""
        deadline = time.perf_counter() + 120
        while not url:
            assert proc.returncode is None and time.perf_counter() < deadline, logs[-5:]
            url = next(
                (r["message"].split()[2] for r in logs if r["message"].startswith("serving on")),
                "",
            )
            await asyncio.sleep(0.1)

        client = RealtimeClient(url)
        await client.connect(ArrayAudioTrack(beckett_audio))
        started = await client.next_event("input_audio_buffer.speech_started", timeout=20)
        await asyncio.sleep(0.3)  # mid-phrase ("ever tried" lasts 0.87 s)
        assert not client.of_type(COMPLETED)

        proc.send_signal(signal.SIGTERM)
        t0 = time.perf_counter()
        refused: dict[str, Any] = {}
        async with aiohttp.ClientSession() as http:
            while not refused and time.perf_counter() - t0 < GRACE_S:
                body = {"sdp": "v=0 m=audio", "type": "offer"}
                async with http.post(f"{url}/api/offer", json=body) as resp:
                    if resp.status == 503:
                        refused = (await resp.json())["error"]
                        assert resp.headers["Retry-After"]
                        async with http.get(f"{url}/readyz") as ready:
                            assert ready.status == 503
                            assert (await ready.json())["status"] == "stopping"
                await asyncio.sleep(0.02)
        assert refused.get("code") == "shutting_down", refused

        done = await client.next_event(COMPLETED, timeout=GRACE_S)
        assert done.event["item_id"] == started.event["item_id"]
        assert "ever" in done.event["transcript"].lower()  # cut mid-phrase: "Ever try."

        rc = await asyncio.wait_for(proc.wait(), GRACE_S + 10)
        elapsed = time.perf_counter() - t0
        assert rc == 0
        assert elapsed < GRACE_S + 3, elapsed
        await reader
        ended = [r for r in logs if " ended (" in r["message"]]
        assert ended and ended[0]["call_id"] == client.pc_id
        assert "server_shutdown" in ended[0]["message"]
    finally:
        if client is not None:
            await client.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
