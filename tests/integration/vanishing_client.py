"""A client process that calls, starts talking, and is then killed by the test (SIGKILL).

Run as ``python -m tests.integration.vanishing_client URL``; prints ``TALKING <pc_id>`` once
the server has heard speech start, then waits to be killed without ever closing its peer.
"""

from __future__ import annotations

import asyncio
import sys

from agent.peer import restrict_host_addresses
from signaling.client import ArrayAudioTrack, RealtimeClient, read_audio
from tests.conftest import BECKETT


async def main(url: str) -> None:
    restrict_host_addresses(["127.0.0.1"])
    client = RealtimeClient(url)
    await client.connect(ArrayAudioTrack(read_audio(BECKETT)))
    await client.next_event("input_audio_buffer.speech_started", timeout=20)
    print("TALKING", client.pc_id, flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
