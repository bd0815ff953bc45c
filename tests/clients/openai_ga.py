"""Drive /v1/realtime with the official openai SDK's GA realtime client (transcription).

Run with .venvs/openai/bin/python. Connects exactly as an application would:

    client = AsyncOpenAI(api_key=token, base_url=f"{base_url}/v1")
    client.realtime.connect(extra_query={"intent": "transcription"}[, model=...])

sends the GA ``session.update`` (``session.type: "transcription"``), streams the WAV in real
time with ``input_audio_buffer.append`` (then silence), optionally commits at given audio
times (``--turn-detection none --commit-at ...``), and prints every server event as one JSON
line ``{"event": <the event as the SDK parsed it>, "sdk_class": ..., "t": ...}``. Exits after
``--expect`` completed/failed items, on ``--timeout``, or when the server closes.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from typing import Any

from _common import base_arguments, emit, encode, paced, read_wav, silence
from _openai_conversation import converse
from openai import AsyncOpenAI


def session_config(args: Any) -> dict[str, Any]:
    fmt: dict[str, Any] = {"type": f"audio/{args.format}"}
    if args.format == "pcm":
        fmt["rate"] = 24000
    transcription: dict[str, Any] = {"model": args.model, "language": args.language}
    if args.prompt:
        transcription["prompt"] = args.prompt
    audio_input: dict[str, Any] = {"format": fmt, "transcription": transcription}
    if args.turn_detection == "none":
        audio_input["turn_detection"] = None
    else:
        audio_input["turn_detection"] = {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": args.silence_ms,
        }
    if args.noise_reduction:
        audio_input["noise_reduction"] = {"type": args.noise_reduction}
    session: dict[str, Any] = {"type": "transcription", "audio": {"input": audio_input}}
    if args.include_logprobs:
        session["include"] = ["item.input_audio_transcription.logprobs"]
    return session


async def main() -> int:
    parser = base_arguments(__doc__ or "")
    parser.add_argument("--base-url", required=True, help="http://127.0.0.1:PORT (no /v1)")
    parser.add_argument("--model", default="gpt-4o-transcribe")
    parser.add_argument("--model-in-url", action="store_true", help="also ?model=")
    parser.add_argument("--format", choices=["pcm", "pcmu", "pcma"], default="pcm")
    parser.add_argument("--language", default="en")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--turn-detection", choices=["server_vad", "none"], default="server_vad")
    parser.add_argument("--silence-ms", type=int, default=500)
    parser.add_argument("--noise-reduction", default="", help="near_field / far_field")
    parser.add_argument("--include-logprobs", action="store_true")
    parser.add_argument(
        "--commit-at", default="", help="comma-separated audio seconds to commit at"
    )
    args = parser.parse_args()

    samples, rate = read_wav(args.wav)
    audio, bytes_per_s = encode(samples, rate, args.format)
    audio += silence(args.format, args.tail_s)
    commits = sorted(float(x) for x in args.commit_at.split(",") if x.strip())

    client = AsyncOpenAI(api_key=args.token, base_url=f"{args.base_url.rstrip('/')}/v1")
    connect_kwargs: dict[str, Any] = {"extra_query": {"intent": "transcription"}}
    if args.model_in_url:
        connect_kwargs["model"] = args.model

    async def configure(conn: Any) -> None:
        await conn.session.update(session=session_config(args))

    async def send(conn: Any) -> None:
        pending = list(commits)
        async for chunk, at in paced(audio, bytes_per_s, args.chunk_ms):
            await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode("ascii"))
            while pending and at >= pending[0]:
                pending.pop(0)
                await conn.input_audio_buffer.commit()
                emit({"driver": "commit", "audio_s": round(at, 3)})
        emit({"driver": "audio_done"})

    return await converse(
        lambda: client.realtime.connect(**connect_kwargs),
        configure,
        send,
        args.expect,
        args.timeout,
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
