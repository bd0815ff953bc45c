"""Drive /v1/realtime with the openai SDK's *beta* realtime client (transcription session).

Run with .venvs/openai/bin/python (openai 3.60.0 still ships ``client.beta.realtime``).
Connects as a beta application would:

    client = AsyncOpenAI(api_key=token, base_url=f"{base_url}/v1",
                         websocket_base_url=f"ws://.../v1")   # else it always uses wss://
    client.beta.realtime.connect(model=..., extra_query={"intent": "transcription"})

(the beta client requires ``model``, always puts it in the URL and adds ``OpenAI-Beta:
realtime=v1``), sends ``transcription_session.update`` (``input_audio_format``
pcm16 / g711_ulaw / g711_alaw), streams the WAV in real time and prints every server event
as one JSON line. Exits after ``--expect`` completed/failed items, on ``--timeout``, or when
the server closes.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from typing import Any

from _common import base_arguments, emit, encode, paced, read_wav, silence
from _openai_conversation import converse
from openai import AsyncOpenAI


async def main() -> int:
    parser = base_arguments(__doc__ or "")
    parser.add_argument("--base-url", required=True, help="http://127.0.0.1:PORT (no /v1)")
    parser.add_argument("--model", default="gpt-4o-transcribe")
    parser.add_argument("--format", choices=["pcm16", "g711_ulaw", "g711_alaw"], default="pcm16")
    parser.add_argument("--language", default="en")
    parser.add_argument("--turn-detection", choices=["server_vad", "none"], default="server_vad")
    parser.add_argument("--silence-ms", type=int, default=500)
    parser.add_argument("--no-intent", action="store_true", help="omit ?intent=transcription")
    args = parser.parse_args()

    samples, rate = read_wav(args.wav)
    audio, bytes_per_s = encode(samples, rate, args.format)
    audio += silence(args.format, args.tail_s)

    http = args.base_url.rstrip("/")
    ws = "ws" + http[len("http") :] if http.startswith("http") else http
    client = AsyncOpenAI(api_key=args.token, base_url=f"{http}/v1", websocket_base_url=f"{ws}/v1")
    extra_query = {} if args.no_intent else {"intent": "transcription"}
    session: dict[str, Any] = {
        "input_audio_format": args.format,
        "input_audio_transcription": {"model": args.model, "language": args.language},
        "turn_detection": None
        if args.turn_detection == "none"
        else {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": args.silence_ms,
        },
    }

    async def configure(conn: Any) -> None:
        await conn.transcription_session.update(session=session)

    async def send(conn: Any) -> None:
        async for chunk, _ in paced(audio, bytes_per_s, args.chunk_ms):
            await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode("ascii"))
        emit({"driver": "audio_done"})

    return await converse(
        lambda: client.beta.realtime.connect(model=args.model, extra_query=extra_query),
        configure,
        send,
        args.expect,
        args.timeout,
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
