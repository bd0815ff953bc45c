"""Phone calls through Twilio Media Streams: a simulated Twilio plays beckett.wav in real
time as 8 kHz mu-law; the real server and the embedded engine transcribe it; a subscriber
socket and a local webhook receiver get the transcripts. Signatures with the real ``twilio``
package. Everything on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any
from xml.etree import ElementTree as ET

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest

from agent.engines.base import Engine
from signaling.app import start_server
from signaling.cli import _JsonFormatter
from tests.conftest import BECKETT_PHRASES, make_config, normalise
from tests.integration.test_robustness import Echo, wait_for
from tests.integration.twilio_support import (
    AUTH_TOKEN,
    COMPLETED,
    MEDIA_PATH,
    TOKEN,
    WebhookReceiver,
    closed,
    open_stream,
    subscribe,
    ws_url,
)
from tests.support.twilio_simulator import mulaw_8k, sign, silence


def heard(events: Sequence[dict[str, Any]]) -> list[str]:
    # tiny.en sometimes hears "fail" as "bail" over the phone line.
    return [normalise(e["transcript"]).replace("bail", "fail") for e in events]


async def test_a_phone_call_reaches_subscribers_and_the_webhook(
    embedded_engine: Engine,
    beckett_audio: npt.NDArray[np.float32],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """beckett over a signed ``<Connect><Stream>`` (inbound only), in real time: a subscriber
    from the start, one that joins late (the completed items so far first), and the webhook
    (whose first POST fails: retried) all get the six phrases, with the call's SID."""
    caplog.set_level(logging.INFO)
    async with WebhookReceiver(fail_first=1) as hook:
        config = make_config(
            SERVER__AUTH_TOKENS=TOKEN,
            TELEPHONY__TWILIO_AUTH_TOKEN=AUTH_TOKEN,
            TELEPHONY__WEBHOOK_URL=hook.url,
        )
        server = await start_server(config, engine=embedded_engine)
        try:
            async with aiohttp.ClientSession() as http:
                stream = await open_stream(http, server, auth_token=AUTH_TOKEN)
                await stream.begin()
                await wait_for(lambda: stream.call_sid in server.state.hubs, 5)
                early = await subscribe(http, server, stream.call_sid)
                audio = mulaw_8k(beckett_audio) + silence(1.5)
                half = len(audio) // 2 // 160 * 160
                await stream.play({"inbound": audio[:half]})
                await early.wait(COMPLETED, 3, timeout=30)
                late = await subscribe(http, server, stream.call_sid)
                await stream.play({"inbound": audio[half:]}, start_ms=half // 8)
                await stream.stop()
                assert await closed(stream) == (1000, "")
                for sub in (early, late):
                    await asyncio.wait_for(sub._reader, 10)  # closed when the call ends
                    completed = sub.of_type(COMPLETED)
                    assert heard(completed) == BECKETT_PHRASES
                    assert {(e["call_sid"], e["track"]) for e in completed} == {
                        (stream.call_sid, "inbound")
                    }
                # The late one got the call's session, then the first three, before anything
                # live.
                kinds = [e["type"] for e in late.received[:4]]
                assert kinds == ["session.created"] + [COMPLETED] * 3, kinds
                assert late.received[0]["track"] == "inbound"
                started = early.of_type("input_audio_buffer.speech_started")
                assert len(started) == 6
                assert all(e["call_sid"] == stream.call_sid for e in started)
            posted = await hook.wait(6)
            assert heard(posted) == BECKETT_PHRASES
            assert all(e["type"] == COMPLETED for e in posted)
            assert hook.attempts == 7  # one retry
            await wait_for(lambda: not server.state.twilio_streams and not server.state.hubs, 5)
            # The logs name the call: its session's records carry the SID and the track, and
            # the JSON log format writes them out.
            ended = [
                r
                for r in caplog.records
                if getattr(r, "call_sid", None) == stream.call_sid and "ended" in r.getMessage()
            ]
            assert ended, [r.getMessage() for r in caplog.records][-20:]
            line = json.loads(_JsonFormatter().format(ended[0]))
            assert (line["call_sid"], line["track"]) == (stream.call_sid, "inbound")
        finally:
            await server.stop()


async def test_both_tracks_are_transcribed_apart(
    embedded_engine: Engine, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """``<Start><Stream track="both_tracks">``: the caller says the first three phrases, the
    other party the last three; each track is its own session and keeps its own words."""
    server = await start_server(make_config(), engine=embedded_engine)
    cut = int(16000 * 4.55)  # between "no matter" and "try again"
    inbound = mulaw_8k(beckett_audio[:cut]) + silence(6.0)
    outbound = silence(cut / 16000) + mulaw_8k(beckett_audio[cut:]) + silence(1.5)
    try:
        async with aiohttp.ClientSession() as http:
            stream = await open_stream(http, server, tracks=("inbound", "outbound"))
            await stream.begin()
            await wait_for(lambda: stream.call_sid in server.state.hubs, 5)
            sub = await subscribe(http, server, stream.call_sid, token=None)
            await stream.play({"inbound": inbound, "outbound": outbound})
            await stream.stop()
            await closed(stream)
            await asyncio.wait_for(sub._reader, 10)
        created = sub.of_type("session.created")
        assert sorted(e["track"] for e in created) == ["inbound", "outbound"]
        assert len({e["session"]["id"] for e in created}) == 2
        assert created[0]["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        by_track = {
            track: [e for e in sub.of_type(COMPLETED) if e["track"] == track]
            for track in ("inbound", "outbound")
        }
        assert heard(by_track["inbound"]) == BECKETT_PHRASES[:3]
        assert heard(by_track["outbound"]) == BECKETT_PHRASES[3:]
        # The outbound track's audio time is the call's: its first phrase starts after 4.5 s.
        starts = [
            e["audio_start_ms"]
            for e in sub.of_type("input_audio_buffer.speech_started")
            if e["track"] == "outbound"
        ]
        assert 4550 < starts[0] < 5200, starts
    finally:
        await server.stop()


# -- admission and security ---------------------------------------------------------------------


@pytest.fixture
async def signed_server() -> Any:
    config = make_config(
        VAD__KIND="energy",
        SERVER__AUTH_TOKENS=TOKEN,
        TELEPHONY__TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TELEPHONY__TWIML_AFTER_START="<Dial>+15551234567</Dial>",
    )
    server = await start_server(config, engine=Echo())
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "signature",
    ["missing", "wrong-token", "other-url"],
)
async def test_an_unsigned_stream_is_refused_at_the_upgrade(
    signed_server: Any, signature: str
) -> None:
    headers = {
        "missing": {},
        "wrong-token": {"X-Twilio-Signature": sign("not-the-token", "wss://x")},
        "other-url": {
            "X-Twilio-Signature": sign(AUTH_TOKEN, "wss://elsewhere.example/v1/twilio/media-stream")
        },
    }[signature]
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            # A bearer token does not replace Twilio's signature once it is configured.
            headers = {**headers, "Authorization": f"Bearer {TOKEN}"}
            await http.ws_connect(ws_url(signed_server, MEDIA_PATH), headers=headers)
        assert refused.value.status == 403
    assert not signed_server.state.twilio_streams


async def test_a_signed_stream_behind_a_proxy() -> None:
    """With ``telephony.public_url``, the signature is over the URL Twilio used, not ours."""
    config = make_config(
        VAD__KIND="energy",
        TELEPHONY__TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TELEPHONY__PUBLIC_URL="https://voice.example.test",
    )
    server = await start_server(config, engine=Echo())
    try:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await open_stream(http, server, auth_token=AUTH_TOKEN)  # signed for our host
            public = "wss://voice.example.test" + MEDIA_PATH
            stream = await open_stream(http, server, auth_token=AUTH_TOKEN, signed_url=public)
            await stream.begin()
            await wait_for(lambda: stream.call_sid in server.state.hubs, 5)
            await stream.stop()
            assert await closed(stream) == (1000, "")
    finally:
        await server.stop()


async def test_the_twiml_webhook_signed(signed_server: Any) -> None:
    form = {"CallSid": "CA0123", "AccountSid": "AC0123", "From": "+15550001111"}
    url = f"{signed_server.url}/v1/twilio/voice"
    async with aiohttp.ClientSession() as http:
        headers = {"X-Twilio-Signature": sign(AUTH_TOKEN, url, form)}
        async with http.post(url, data=form, headers=headers) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/xml"
            root = ET.fromstring(await resp.text())
        stream = root.find("./Start/Stream")
        assert stream is not None
        assert stream.get("url") == f"wss://{signed_server.host}:{signed_server.port}{MEDIA_PATH}"
        assert stream.get("track") == "both_tracks"
        assert stream.findall("Parameter") == []  # signed: no token travels
        assert [child.tag for child in root] == ["Start", "Dial"]
        assert root.findtext("Dial") == "+15551234567"

        tampered = {**form, "From": "+15559999999"}
        async with http.post(url, data=tampered, headers=headers) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "invalid_signature"
        async with http.post(url, data=form) as resp:
            assert resp.status == 403


@pytest.fixture
async def token_server() -> Any:
    config = make_config(VAD__KIND="energy", SERVER__AUTH_TOKENS=TOKEN)
    server = await start_server(config, engine=Echo())
    try:
        yield server
    finally:
        await server.stop()


async def test_without_signatures_the_token_is_a_stream_parameter(
    token_server: Any, beckett_audio: npt.NDArray[np.float32]
) -> None:
    """Twilio cannot send our header: the token comes as ``<Parameter name="token">`` in
    ``start``. Without it the stream is closed at ``start`` with nothing started."""
    async with aiohttp.ClientSession() as http:
        refused = await open_stream(http, token_server, parameters={"token": "wrong" * 4})
        await refused.begin()
        code, reason = await closed(refused)
        assert code == 1008 and reason.startswith("unauthorized"), (code, reason)
        assert not token_server.state.hubs

        stream = await open_stream(http, token_server, parameters={"token": TOKEN})
        await stream.begin()
        await wait_for(lambda: stream.call_sid in token_server.state.hubs, 5)
        with pytest.raises(aiohttp.WSServerHandshakeError) as anonymous:
            await subscribe(http, token_server, stream.call_sid, token=None)
        assert anonymous.value.status == 401  # subscribers always need the token
        sub = await subscribe(http, token_server, stream.call_sid)
        await stream.play({"inbound": mulaw_8k(beckett_audio[: int(16000 * 1.6)])}, speed=4)
        await stream.stop()
        await closed(stream)
        await asyncio.wait_for(sub._reader, 10)
        assert len(sub.of_type(COMPLETED)) == 1

        # A header, when there is one, is judged at the upgrade.
        with pytest.raises(aiohttp.WSServerHandshakeError) as bad_header:
            await open_stream(http, token_server, headers={"Authorization": "Bearer nope"})
        assert bad_header.value.status == 401
    await wait_for(lambda: not token_server.state.twilio_streams, 5)


async def test_the_twiml_webhook_with_basic_auth(token_server: Any) -> None:
    """Without a Twilio token, the webhook takes the bearer token as Basic credentials (as
    Twilio sends them for ``https://any:TOKEN@host/...``, once challenged), and hands it to
    the stream as a ``<Parameter>``."""
    url = f"{token_server.url}/v1/twilio/voice"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data={"CallSid": "CA1"}) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Basic ")
        auth = aiohttp.BasicAuth("twilio", TOKEN)
        async with http.post(url, data={"CallSid": "CA1"}, auth=auth) as resp:
            assert resp.status == 200
            root = ET.fromstring(await resp.text())
        [param] = root.findall("./Start/Stream/Parameter")
        assert (param.get("name"), param.get("value")) == ("token", TOKEN)
        assert root.find("Pause") is not None  # the default twiml_after_start


async def test_subscribing_to_an_unknown_call(token_server: Any) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as unknown:
            await subscribe(http, token_server, "CA-no-such-call")
        assert unknown.value.status == 404


async def test_tracks_count_against_max_calls() -> None:
    """A ``both_tracks`` stream is two sessions: with ``max_calls`` 2 nothing else gets in,
    and with 1 its ``start`` is refused (1013, try later)."""
    config = make_config(VAD__KIND="energy", LIMITS__MAX_CALLS="2")
    server = await start_server(config, engine=Echo())
    try:
        async with aiohttp.ClientSession() as http:
            both = await open_stream(http, server, tracks=("inbound", "outbound"))
            await both.begin()
            await wait_for(lambda: server.state.live_sessions == 2, 5)
            with pytest.raises(aiohttp.WSServerHandshakeError) as full:
                await http.ws_connect(ws_url(server, "/v1/realtime?intent=transcription"))
            assert full.value.status == 503
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await open_stream(http, server)
            await both.stop()
            await closed(both)
            await wait_for(lambda: server.state.live_sessions == 0, 5)

            single = await open_stream(http, server)  # takes one slot
            await single.begin()
            both = await open_stream(http, server, tracks=("inbound", "outbound"))
            await both.begin()
            code, reason = await closed(both)
            assert code == 1013 and reason.startswith("too_many_calls")
            await single.stop()
            await closed(single)
        await wait_for(lambda: not server.state.twilio_streams, 5)
    finally:
        await server.stop()
