"""Drive the server with LiveKit Agents' OpenAI STT plugin, as an agent would.

Run with .venvs/livekit/bin/python. Two modes:

* streaming (default): ``livekit.plugins.openai.STT(use_realtime=True, base_url=.../v1,
  api_key=token, model=...)``; ``.stream()`` is fed 20 ms ``livekit.rtc.AudioFrame``s of the
  WAV at its own rate in real time, then silence (the plugin resamples to 24 kHz, sends 50 ms
  ``input_audio_buffer.append``s to ``/v1/realtime?intent=transcription&model=...`` and
  leaves endpointing to the server's VAD). Prints one JSON line per ``SpeechEvent``:
  ``{"event": "INTERIM_TRANSCRIPT" | "FINAL_TRANSCRIPT" | "START_OF_SPEECH" | ..., "text"}``;
  exits after ``--expect`` finals or on ``--timeout``.
* ``--file``: ``STT(use_realtime=False)``, ``recognize()`` on the whole WAV, which posts it
  to ``/v1/audio/transcriptions``; prints the one FINAL_TRANSCRIPT.

Outside a LiveKit job the plugin needs ``utils.http_context.open()`` for its aiohttp session.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from _common import base_arguments, emit, read_wav
from livekit import rtc
from livekit.agents import APIConnectOptions, stt, utils
from livekit.plugins import openai


def event_record(ev: stt.SpeechEvent) -> dict[str, Any]:
    record: dict[str, Any] = {"event": ev.type.name, "request_id": ev.request_id}
    if ev.alternatives:
        record["text"] = ev.alternatives[0].text
        record["language"] = str(ev.alternatives[0].language)
    if ev.recognition_usage is not None:
        record["audio_duration"] = ev.recognition_usage.audio_duration
    return record


async def stream_mode(args: Any, samples: Any, rate: int) -> int:
    model = openai.STT(
        use_realtime=True,
        base_url=f"{args.base_url.rstrip('/')}/v1",
        api_key=args.token,
        model=args.model,
        language=args.language,
    )
    # No retries: a test should see the first failure, not a reconnect loop.
    stream = model.stream(conn_options=APIConnectOptions(max_retry=0, timeout=10.0))
    per_chunk = rate * args.chunk_ms // 1000

    async def feed() -> None:
        data = samples.tobytes() + bytes(2 * int(rate * args.tail_s))
        step = 2 * per_chunk
        start = time.monotonic()
        for k, at in enumerate(range(0, len(data), step)):
            delay = start + k * args.chunk_ms / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = data[at : at + step].ljust(step, b"\0")
            stream.push_frame(
                rtc.AudioFrame(
                    data=chunk, sample_rate=rate, num_channels=1, samples_per_channel=per_chunk
                )
            )
        emit({"driver": "audio_done"})
        # No end_input(): it would only flush; the socket stays open for the last finals.

    finals = 0
    feeder = asyncio.create_task(feed())
    code = 0
    try:
        async with asyncio.timeout(args.timeout):
            async for ev in stream:
                emit(event_record(ev))
                if ev.type == stt.SpeechEventType.FINAL_TRANSCRIPT:
                    finals += 1
                    if finals >= args.expect:
                        break
            else:
                emit({"driver": "stream_ended", "finals": finals})
    except TimeoutError:
        emit({"driver": "timeout", "finals": finals})
        code = 3
    except Exception as exc:  # the plugin's APIError / APIStatusError / APIConnectionError
        emit({"driver": "error", "kind": type(exc).__name__, "message": str(exc)})
        code = 2
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        await stream.aclose()
        await model.aclose()
    if code == 0:
        emit({"driver": "done", "finals": finals})
    return code


async def file_mode(args: Any, samples: Any, rate: int) -> int:
    model = openai.STT(
        use_realtime=False,
        base_url=f"{args.base_url.rstrip('/')}/v1",
        api_key=args.token,
        model=args.model,
        language=args.language,
    )
    frame = rtc.AudioFrame(
        data=samples.tobytes(), sample_rate=rate, num_channels=1, samples_per_channel=len(samples)
    )
    try:
        async with asyncio.timeout(args.timeout):
            ev = await model.recognize(
                [frame], conn_options=APIConnectOptions(max_retry=0, timeout=10.0)
            )
    except TimeoutError:
        emit({"driver": "timeout"})
        return 3
    except Exception as exc:
        emit({"driver": "error", "kind": type(exc).__name__, "message": str(exc)})
        return 2
    emit(event_record(ev))
    emit({"driver": "done", "finals": 1})
    return 0


async def main() -> int:
    parser = base_arguments(__doc__ or "")
    parser.add_argument("--base-url", required=True, help="http://127.0.0.1:PORT (no /v1)")
    parser.add_argument("--model", default="gpt-4o-mini-transcribe")
    parser.add_argument("--language", default="en")
    parser.add_argument("--file", action="store_true", help="recognize() the whole WAV")
    args = parser.parse_args()
    samples, rate = read_wav(args.wav)
    async with utils.http_context.open():
        if args.file:
            return await file_mode(args, samples, rate)
        return await stream_mode(args, samples, rate)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
