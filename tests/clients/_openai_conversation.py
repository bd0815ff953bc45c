"""What both openai drivers do once connected (run with .venvs/openai/bin/python).

``converse`` opens the SDK's connection, lets the driver configure the session and send its
audio, prints every server event as the SDK parsed it, stops after ``expect``
completed/failed items, and turns each way of failing into an exit code and a JSON line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from _common import emit
from openai import OpenAIError

COMPLETED = "conversation.item.input_audio_transcription.completed"
FAILED = "conversation.item.input_audio_transcription.failed"


def record_of(event: Any) -> dict[str, Any]:
    """One server event as printed: the SDK's parse, and what an application reads."""
    record: dict[str, Any] = {"event": event.to_dict(), "sdk_class": type(event).__name__}
    session = getattr(event, "session", None)
    if session is not None:
        record["sdk_session_class"] = type(session).__name__
    if event.type == COMPLETED:
        usage = getattr(event, "usage", None)
        record["sdk_transcript"] = event.transcript
        record["sdk_usage_type"] = getattr(usage, "type", None)
        record["sdk_usage_seconds"] = getattr(usage, "seconds", None)
    return record


async def converse(
    connect: Callable[[], AbstractAsyncContextManager[Any]],
    configure: Callable[[Any], Awaitable[None]],
    send: Callable[[Any], Awaitable[None]],
    expect: int,
    timeout_s: float,
) -> int:
    """0 after ``expect`` items; 2 on an error (a refused upgrade too); 3 on the timeout."""
    finals = 0
    try:
        async with asyncio.timeout(timeout_s), connect() as conn:
            emit({"driver": "connected"})
            await configure(conn)
            sender = asyncio.create_task(send(conn))
            try:
                async for event in conn:
                    emit(record_of(event))
                    if event.type in (COMPLETED, FAILED):
                        finals += 1
                        if finals >= expect:
                            break
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
    except TimeoutError:
        emit({"driver": "timeout", "finals": finals})
        return 3
    except (OpenAIError, OSError) as exc:
        emit({"driver": "error", "kind": type(exc).__name__, "message": str(exc)})
        return 2
    except Exception as exc:  # websockets' InvalidStatus for a refused upgrade, and the like
        status = getattr(getattr(exc, "response", None), "status_code", None)
        emit({"driver": "error", "kind": type(exc).__name__, "message": str(exc), "status": status})
        return 2
    emit({"driver": "done", "finals": finals})
    return 0
