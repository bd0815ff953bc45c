"""What the Twilio tests share: connecting a simulated stream, a subscriber, a webhook receiver.

Everything listens on 127.0.0.1: the server, and the webhook receiver it POSTs to.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web

from signaling.app import RunningServer
from tests.integration.test_realtime_ws import Socket
from tests.support.twilio_simulator import TwilioStream, sign

MEDIA_PATH = "/v1/twilio/media-stream"
COMPLETED = "conversation.item.input_audio_transcription.completed"
TOKEN = "test-token-0123456789abcdef"
AUTH_TOKEN = "twilio-auth-token-0123456789"


def ws_url(server: RunningServer, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


async def open_stream(
    http: aiohttp.ClientSession,
    server: RunningServer,
    *,
    auth_token: str | None = None,
    signed_url: str | None = None,
    headers: Mapping[str, str] | None = None,
    **stream_args: Any,
) -> TwilioStream:
    """A WebSocket to the media-stream route, signed as Twilio signs it when ``auth_token``
    is given (over ``signed_url``: by default the wss:// URL of this server)."""
    sent = dict(headers or {})
    if auth_token is not None:
        url = signed_url or f"wss://{server.host}:{server.port}{MEDIA_PATH}"
        sent["X-Twilio-Signature"] = sign(auth_token, url)
    ws = await http.ws_connect(ws_url(server, MEDIA_PATH), headers=sent)
    return TwilioStream(ws, **stream_args)


async def subscribe(
    http: aiohttp.ClientSession, server: RunningServer, call_sid: str, token: str | None = TOKEN
) -> Socket:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ws = await http.ws_connect(ws_url(server, f"/v1/calls/{call_sid}/events"), headers=headers)
    return Socket(ws)


async def closed(stream: TwilioStream, timeout: float = 10) -> tuple[int | None, str]:
    """Read until the server closes the stream: its close code and reason. The server must
    never send Twilio anything (on a ``<Connect><Stream>`` it would be played to the caller)."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await stream.ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"the server sent Twilio a message: {msg.data}")
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return int(msg.data), str(msg.extra or "")
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return stream.ws.close_code, ""


class WebhookReceiver:
    """A local HTTP server on 127.0.0.1 that records the JSON POSTed to it; the first
    ``fail_first`` POSTs get a 503 (the sender must retry them)."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        self._fail_first = fail_first
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self._fail_first:
            return web.Response(status=503)
        assert request.content_type == "application/json"
        self.received.append(json.loads(await request.text()))
        return web.Response(status=204)

    async def wait(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} webhook POSTs not received: {self.received}")
            await asyncio.sleep(0.05)
        return self.received
