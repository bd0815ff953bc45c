"""Hostile media on ``POST /v1/audio/transcriptions``: the real server and embedded engine on
127.0.0.1, and the decoder processes themselves.

Files that FFmpeg would read as a playlist (server files, existence probes) or as an SDP
session (UDP ports of the client's choosing) are refused at once, without a file read or a
socket opened; tiny WAVs that claim 1 Hz or 100 MHz are refused without the server's
memory growing or ``/healthz`` slowing down; good audio in every common container still
transcribes. A watcher process samples the memory of the server (this process) and of its decoder
processes and polls ``/healthz`` every 20 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio

from agent.audio_file import ACCEPTED
from agent.decoder_process import DecodeLimits, DecoderPool
from agent.engines.base import Engine
from agent.errors import AudioInputError
from signaling.app import RunningServer, start_server
from tests.conftest import BECKETT, BECKETT_PHRASES, make_config, normalise
from tests.support.audio_files import encode, wav_bytes
from tests.unit.test_audio_file import AIFF_1HZ, WAV_BOMBS, lying_mp3

pytestmark = pytest.mark.asyncio(loop_scope="module")

PATH = "/v1/audio/transcriptions"
REFERENCE = " ".join(BECKETT_PHRASES)
#: The issue's bounds: refused within a second, 300 MB of memory, /healthz within 200 ms.
REFUSE_S = 1.0
MAX_GROWTH_BYTES = 300 << 20
MAX_HEALTH_S = 0.2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(embedded_engine: Engine) -> AsyncIterator[RunningServer]:
    running = await start_server(make_config(), engine=embedded_engine)
    # One good file first: the decoder pool has started and keeps its spare process, so
    # the memory baseline of each test below includes it.
    status, body = await post(running, BECKETT.read_bytes())
    assert status == 200, body
    yield running
    await running.stop()


async def post(
    server: RunningServer, data: bytes, filename: str = "a.wav", timeout_s: float = 120
) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("file", data, filename=filename, content_type="application/octet-stream")
    form.add_field("model", "whisper-1")
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as http_session:
        async with http_session.post(server.url + PATH, data=form) as resp:
            return resp.status, json.loads(await resp.text())


# -- watching the server while it handles a file ---------------------------------------------


@dataclass
class Watch:
    """What the watcher process saw: peak memory, each /healthz time, UDP ports in use."""

    baseline_bytes: int = 0
    peak_bytes: int = 0
    health_s: list[float] = field(default_factory=list)
    udp_ports: dict[int, int] = field(default_factory=dict)  # port -> most sockets seen on it

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes


#: The watcher: a separate process (stdlib only), so that a server stalled in C code with
#: the GIL held cannot stall the measurement too. Every 5 ms it sums the resident memory of
#: the server (argv[1]) and its children and counts the UDP sockets on the ports named
#: (any process); a thread polls /healthz every 20 ms. It says "ready" with its first
#: figure, and when its stdin closes it prints what it saw as JSON.
WATCHER = """
import http.client, json, sys, threading, time
from pathlib import Path

pid, host, port, ports = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
seen = {"peak": 0, "health": [], "udp": dict.fromkeys(ports, 0)}
stop = threading.Event()

def rss(p):
    try:
        lines = Path(f"/proc/{p}/status").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(ln.split()[1]) * 1024 for ln in lines if ln.startswith("VmRSS:"))

def cmdline(p):
    try:
        return Path(f"/proc/{p}/cmdline").read_bytes()
    except OSError:
        return b""

def children():
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += (task / "children").read_text().split()
        except OSError:
            pass
    # A child between vfork and exec still is the server (same memory): not counted twice.
    return [c for c in found if cmdline(c) != server_cmdline]

def udp():
    counts = dict.fromkeys(ports, 0)
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local = str(int(line.split()[1].rsplit(":", 1)[1], 16))
            if local in counts:
                counts[local] += 1
    return counts

def sample():
    seen["peak"] = max(seen["peak"], rss(pid) + sum(rss(c) for c in children()))
    for p, n in udp().items():
        seen["udp"][p] = max(seen["udp"][p], n)

def poll():
    conn = http.client.HTTPConnection(host, port, timeout=60)
    while not stop.is_set():
        started = time.perf_counter()
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        ok = response.status == 200
        seen["health"].append(time.perf_counter() - started if ok else float("inf"))
        stop.wait(0.02)

server_cmdline = cmdline(pid)
sample()
baseline = seen["peak"]
poller = threading.Thread(target=poll)
poller.start()
print("ready", flush=True)
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
while not stop.is_set():
    sample()
    stop.wait(0.005)
poller.join()
print(json.dumps({**seen, "baseline": baseline}), flush=True)
"""


@contextlib.asynccontextmanager
async def watching(
    server: RunningServer, ports: frozenset[int] = frozenset()
) -> AsyncIterator[Watch]:
    """Watch the server (this process) while the body runs; the figures are in the
    ``Watch`` once the block is left."""
    args = [str(os.getpid()), server.host, str(server.port), *map(str, sorted(ports))]
    watcher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WATCHER, *args, stdin=PIPE, stdout=PIPE
    )
    assert watcher.stdin is not None and watcher.stdout is not None
    assert await watcher.stdout.readline() == b"ready\n"
    await asyncio.sleep(0.05)  # a few polls before the file goes out
    watch = Watch()
    try:
        yield watch
        await asyncio.sleep(0.05)
    finally:
        watcher.stdin.close()
        out, _ = await watcher.communicate()
    seen = json.loads(out)
    watch.baseline_bytes, watch.peak_bytes = seen["baseline"], seen["peak"]
    watch.health_s = seen["health"]
    watch.udp_ports = {int(p): n for p, n in seen["udp"].items()}


def child_pids() -> list[int]:
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def decoder_pids() -> set[int]:
    """This process's children that are decoder processes."""
    found = set()
    for pid in child_pids():
        with contextlib.suppress(OSError):
            if b"agent.decoder_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
    return found


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


# -- files that are not audio ----------------------------------------------------------------

#: The refusal every non-audio file gets: the same words whatever the file names.
REFUSAL = f"not a supported audio file: the accepted formats are {ACCEPTED}"


@pytest.mark.parametrize(
    "text",
    [
        f"ffconcat version 1.0\nfile {os.path.relpath(BECKETT)}\n",  # relative, as reported
        f"ffconcat version 1.0\nfile {BECKETT}\n",
        "ffconcat version 1.0\nfile /no/such/dir/missing.wav\n",
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{BECKETT}\n#EXT-X-ENDLIST\n",
    ],
    ids=["ffconcat-relative", "ffconcat-absolute", "ffconcat-missing", "hls"],
)
async def test_playlists_read_no_server_file(server: RunningServer, text: str) -> None:
    """Refused at once with the same words whether the named file exists or not: the
    server file is not transcribed, and its existence cannot be probed."""
    started = time.perf_counter()
    status, body = await post(server, text.encode(), filename="a.wav")
    elapsed = time.perf_counter() - started
    assert (status, body["error"]["code"]) == (400, "invalid_audio"), body
    assert body["error"]["message"] == REFUSAL
    assert elapsed < REFUSE_S


@pytest.mark.parametrize("held", [False, True], ids=["free-port", "listened-port"])
async def test_an_sdp_opens_no_socket(server: RunningServer, held: bool) -> None:
    """An SDP naming a 127.0.0.1 port: refused at once, no socket bound on that port or the
    next (RTCP), in the server or a decoder process, and no packet sent to a listener."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    if not held:
        listener.close()  # a free port: FFmpeg used to bind it and wait 20 s for RTP
    sdp = (
        f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio {port} RTP/AVP 0\n"
    ).encode()
    try:
        async with watching(server, frozenset({port, port + 1})) as watch:
            started = time.perf_counter()
            status, body = await post(server, sdp, filename="a.sdp", timeout_s=30)
            elapsed = time.perf_counter() - started
        assert (status, body["error"]["code"]) == (400, "invalid_audio"), body
        assert body["error"]["message"] == REFUSAL
        assert elapsed < REFUSE_S
        assert watch.udp_ports == {port: int(held), port + 1: 0}
        if held:
            with pytest.raises(BlockingIOError):
                listener.recv(2048)
    finally:
        listener.close()


# -- files that expand -----------------------------------------------------------------------


#: The report's WAVs (refused from their header, before any decoder process) and an AIFF
#: at 1 Hz (refused in the decoder process, from FFmpeg's figure).
BOMBS = {**WAV_BOMBS, "aiff_1hz": AIFF_1HZ}


@pytest.mark.parametrize("name", sorted(BOMBS))
async def test_bombs_are_refused_cheaply(server: RunningServer, name: str) -> None:
    """Refused (4xx) with the server's memory within 300 MB of where it was and /healthz
    answering within 200 ms all along."""
    async with watching(server) as watch:
        status, body = await post(server, BOMBS[name], timeout_s=60)
    assert 400 <= status < 500 and body["error"]["code"] == "invalid_audio", body
    assert "sample rate" in body["error"]["message"]
    assert watch.growth_bytes < MAX_GROWTH_BYTES, watch
    assert watch.health_s and max(watch.health_s) < MAX_HEALTH_S, watch.health_s


async def test_what_start_up_loaded_is_frozen_out_of_collections(
    server: RunningServer, embedded_engine: Engine
) -> None:
    """A full collection walks every tracked object with the GIL held; over the libraries
    and the model that stalled ``/healthz`` past 200 ms (0.30 s on CI). Frozen when the
    server became ready, the engine and all loaded before it are no longer walked."""
    assert server.state.status == "ready"
    assert gc.get_freeze_count() > 0
    assert not any(obj is embedded_engine for obj in gc.get_objects())


async def test_a_file_longer_than_it_declares_stops_at_the_limit(
    embedded_engine: Engine,
) -> None:
    """Decoded up to ``limits.max_audio_s`` only, then 413 from the decoder process."""
    running = await start_server(make_config(LIMITS__MAX_AUDIO_S="10"), engine=embedded_engine)
    data = lying_mp3()  # encoded before the watch: it would hold up the server's loop
    try:
        async with watching(running) as watch:
            status, body = await post(running, data, filename="a.mp3", timeout_s=60)
        assert (status, body["error"]["code"]) == (413, "audio_too_long"), body
        assert "limits.max_audio_s" in body["error"]["message"]
        assert watch.growth_bytes < MAX_GROWTH_BYTES, watch
        assert watch.health_s and max(watch.health_s) < MAX_HEALTH_S, watch.health_s
    finally:
        await running.stop()


# -- good audio still works ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["beckett.wav", "mp3", "ogg", "flac", "webm"])
async def test_good_audio_still_transcribes(
    server: RunningServer, kind: str, beckett_audio: npt.NDArray[np.float32]
) -> None:
    data = BECKETT.read_bytes() if kind == "beckett.wav" else encode(beckett_audio, kind)
    async with watching(server) as watch:
        status, body = await post(server, data, filename=f"speech.{kind.rsplit('.', 1)[-1]}")
    assert status == 200, body
    assert normalise(body["text"]) == REFERENCE
    assert watch.health_s and max(watch.health_s) < MAX_HEALTH_S, watch.health_s


# -- the decoder processes -------------------------------------------------------------------


async def test_the_memory_limit_refuses_the_file_not_the_server() -> None:
    """A decode over its process's memory limit is ``audio_too_complex`` (a 400), and the
    pool goes on decoding."""
    others = decoder_pids()  # the server fixture's spare, if it is running
    tight = DecoderPool(DecodeLimits(max_audio_s=30, timeout_s=60, headroom_bytes=0))
    samples = np.tile(np.linspace(-0.5, 0.5, 16_000, dtype=np.float32), 20)  # 20 s
    try:
        with pytest.raises(AudioInputError) as info:
            await tight.decode(encode(samples, "wav"))
        assert info.value.code == "audio_too_complex"
        assert "more memory" in str(info.value)
    finally:
        await tight.close()
    roomy = DecoderPool(DecodeLimits(max_audio_s=30, timeout_s=60))
    try:
        assert (await roomy.decode(wav_bytes(samples))).duration_s == pytest.approx(20, abs=0.01)
    finally:
        await roomy.close()
    assert decoder_pids() <= others


async def test_a_decode_past_its_deadline_is_killed() -> None:
    others = decoder_pids()
    pool = DecoderPool(DecodeLimits(max_audio_s=7200, timeout_s=0.05))
    try:
        with pytest.raises(AudioInputError) as info:
            await pool.decode(wav_bytes(np.zeros(16_000 * 600, dtype=np.float32)))
        assert info.value.code == "audio_too_complex"
        assert "limits.decode_timeout_s" in str(info.value)
        assert len(decoder_pids() - others) <= 1  # the spare, waiting for the next file
    finally:
        await pool.close()
    assert decoder_pids() <= others


async def test_a_cancelled_decode_kills_its_process() -> None:
    """The client went away (aiohttp cancels the handler): its decoder is killed and
    reaped, the spare stays."""
    others = decoder_pids()
    pool = DecoderPool(DecodeLimits(max_audio_s=7200, timeout_s=60))
    long_file = wav_bytes(np.zeros(8_000 * 1800, dtype=np.float32), rate=8_000)  # 30 min
    try:
        task = asyncio.create_task(pool.decode(long_file))
        await asyncio.sleep(0.3)
        running = decoder_pids() - others
        assert len(running) == 2 and not task.done()  # the job's process and the spare
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        left = decoder_pids() - others
        assert len(left) == 1 and left < running
        (killed,) = running - left
        assert not process_exists(killed)  # killed and reaped, not left a zombie
    finally:
        task.cancel()
        await pool.close()
    assert decoder_pids() <= others
