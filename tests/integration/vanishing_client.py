"""A client process that calls, starts talking, and is then killed by the test (SIGKILL).

Run as ``python -m tests.integration.vanishing_client URL``; prints ``TALKING <pc_id>`` once
the server has heard speech start, then waits to be killed without ever closing its peer.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agent.transports.webrtc_peer import restrict_host_addresses
from tests.conftest import BECKETT
from voxtral_rtc_client import ArrayAudioTrack, RealtimeClient, read_audio

REPO = Path(__file__).resolve().parents[2]


async def start_talking(url: str) -> asyncio.subprocess.Process:
    """Run this client in its own process; return once the server has heard it talk."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.vanishing_client",
        url,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.startswith(b"TALKING"), line
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc


async def main(url: str) -> None:
    restrict_host_addresses(["127.0.0.1"])
    client = RealtimeClient(url)
    await client.connect(ArrayAudioTrack(read_audio(BECKETT)))
    await client.next_event("input_audio_buffer.speech_started", timeout=20)
    print("TALKING", client.pc_id, flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
