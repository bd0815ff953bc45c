"""One live ``/v1/realtime`` session held against the same engine offline on the same bytes.

What a WebSocket client sends is pcm16 at 24 kHz; the bench client makes it from the file
with soxr (``bench/socket_clients.WsAudio``). This script

1. streams those bytes at the pace of the clock to a server of its own (``signaling.cli serve``
   on 127.0.0.1, the embedded engine, the defaults) and records every event;
2. decodes, offline, the live path's turns of the 16-kHz audio the server makes of the same
   bytes (its resampler, its VAD and segmenter, each turn behind the one before it, as
   ``bench/offline_wer.py --turns-only`` does);
3. runs the file path (``voxtral-rtc transcribe``, the defaults) on the same 24-kHz bytes;

and prints the three word error rates and every item where the live final and the offline
turn differ (bounds or words): what the live path itself adds, and what the turn-by-turn
decode costs against 30-s pieces.

    .venv/bin/python bench/live_vs_offline.py /tmp/read8.wav      # reference: /tmp/read8.txt

Saves the table and the item-by-item comparison under bench/results/ (``--no-save``: not).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    free_port,
    loopback_config,
    machine_info,
    markdown_table,
    save_results,
    subprocess_server,
    word_errors,
)
from bench.offline_wer import cli_text, turns
from bench.socket_clients import WS_RATE, WsAudio, WsClient, to_pcm16
from voxtral_rtc_client.text import normalise

CHUNK_MS = 50
#: After the file: silence long enough for the last turn's final.
TAIL_S = 4.0


def server_audio(pcm: Any) -> Any:
    """The 16-kHz float32 the server makes of the client's pcm16 (its own resampler)."""
    import av
    import numpy as np

    from agent.audio_formats import resampler

    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = WS_RATE
    resample = resampler()
    out = [*resample.resample(frame), *resample.resample(None)]
    return np.concatenate([o.to_ndarray().reshape(-1) for o in out]).astype(np.float32)


async def live_items(samples: Any, work: Path) -> list[dict[str, Any]]:
    """One paced WebSocket session: its items in order (bounds, final text)."""
    port = free_port()
    config_path = work / "server.yaml"
    loopback_config(None, port, config_path)
    async with subprocess_server(config_path, port) as server:
        client = WsClient(server.url, WsAudio(samples, CHUNK_MS))
        await client.connect()
        await asyncio.sleep(len(samples) / 16_000 + TAIL_S)
        await client.close()
    items: dict[str, dict[str, Any]] = {}
    for received in client.received:
        event = received.event
        kind, item_id = event.get("type", ""), str(event.get("item_id"))
        if kind == "input_audio_buffer.speech_started":
            items.setdefault(item_id, {})["start"] = event["audio_start_ms"]
        elif kind == "input_audio_buffer.speech_stopped":
            items.setdefault(item_id, {})["end"] = event["audio_end_ms"]
        elif kind == "conversation.item.input_audio_transcription.completed":
            items.setdefault(item_id, {})["text"] = event["transcript"]
    return [item for item in items.values() if "text" in item]


def offline_items(audio: Any) -> list[dict[str, Any]]:
    """The live path's turns of ``audio``, each decoded behind the one before it."""
    return [
        {"start": turn.start_ms, "end": turn.end_ms, "text": text} for turn, text in turns(audio)
    ]


def differences(live: list[dict[str, Any]], offline: list[dict[str, Any]]) -> list[str]:
    """Items whose bounds or normalised words differ, in order (by position: the same
    segmenter on the same audio cuts the same turns, or the first difference says so)."""
    lines = []
    for k in range(max(len(live), len(offline))):
        a = live[k] if k < len(live) else {}
        b = offline[k] if k < len(offline) else {}
        same_bounds = (a.get("start"), a.get("end")) == (b.get("start"), b.get("end"))
        if same_bounds and normalise(a.get("text", "")) == normalise(b.get("text", "")):
            continue
        lines.append(
            f"- item {k}: live {a.get('start')}-{a.get('end')} ms {a.get('text', '')!r}; "
            f"offline {b.get('start')}-{b.get('end')} ms {b.get('text', '')!r}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wav", type=Path)
    parser.add_argument("--reference", type=Path, help="default: the WAV's .txt")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    reference = (args.reference or args.wav.with_suffix(".txt")).read_text()

    import soundfile

    from voxtral_rtc_client import read_audio

    samples = read_audio(args.wav)
    pcm = to_pcm16(samples, WS_RATE)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sent = work / "sent-24k.wav"
        soundfile.write(sent, pcm, WS_RATE, subtype="PCM_16")
        live = asyncio.run(live_items(samples, work))
        offline = offline_items(server_audio(pcm))
        file_text = cli_text(sent, "fit")

    def row(name: str, text: str) -> list[object]:
        errors, words = word_errors(text, reference)
        return [name, f"{100 * errors / words:.1f}", f"{errors}/{words}"]

    rows = [
        row(f"live over the WebSocket ({len(live)} items)", " ".join(i["text"] for i in live)),
        row(
            f"the live path's turns offline, on the server's 16 kHz ({len(offline)} turns)",
            " ".join(i["text"] for i in offline),
        ),
        row("the file path (`voxtral-rtc transcribe`) on the 24-kHz bytes sent", file_text),
    ]
    diff = differences(live, offline)
    markdown = "\n".join(
        [
            f"# Live against offline on the same bytes: {args.wav.name}",
            "",
            markdown_table(["run", "WER %", "errors/words"], rows),
            "",
            f"Items where the live final and the offline turn differ: {len(diff)}",
            *diff,
        ]
    )
    print(markdown)
    if not args.no_save:
        report = {
            "machine": machine_info(),
            "audio": str(args.wav),
            "rows": rows,
            "live": live,
            "offline": offline,
            "differences": diff,
        }
        for path in save_results("live_vs_offline", report, markdown):
            print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
