"""``server.tls_cert_file`` / ``tls_key_file``: the page, the API and the WebSockets over TLS,
with a certificate made in the test; and the start-up errors for files that cannot be used."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from agent.audio_file import read_audio
from signaling.app import RunningServer, start_server
from tests.conftest import BECKETT, make_config
from tests.integration.test_robustness import Echo
from tests.support.tls_cert import SelfSignedCert, make_test_cert

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cert(tmp_path: Path) -> SelfSignedCert:
    return make_test_cert(tmp_path / "tls", ["127.0.0.1"])


@pytest.fixture
async def tls_server(cert: SelfSignedCert) -> AsyncIterator[RunningServer]:
    config = make_config(
        VAD__KIND="energy",
        SERVER__TLS_CERT_FILE=str(cert.cert_file),
        SERVER__TLS_KEY_FILE=str(cert.key_file),
    )
    server = await start_server(config, engine=Echo())
    try:
        yield server
    finally:
        await server.stop()


async def test_page_api_and_websocket_over_tls(
    tls_server: RunningServer, cert: SelfSignedCert
) -> None:
    assert tls_server.url.startswith("https://127.0.0.1:")
    connector = aiohttp.TCPConnector(ssl=cert.client_context())
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{tls_server.url}/") as r:
            assert r.status == 200 and "<html" in (await r.text()).lower()
        async with http.get(f"{tls_server.url}/api/config") as r:
            assert r.status == 200
            assert (await r.json())["data_channel"] == "oai-events"

        # wss: a transcription session, audio up and its transcript down.
        ws_url = tls_server.url.replace("https://", "wss://") + "/v1/realtime?intent=transcription"
        async with http.ws_connect(ws_url) as ws:
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "session.created"
            audio = read_audio(BECKETT)[: 16_000 * 3]
            at_24k = np.interp(np.arange(0, len(audio), 16 / 24), np.arange(len(audio)), audio)
            pcm = (np.concatenate([at_24k, np.zeros(24_000)]) * 32767).astype("<i2").tobytes()
            for i in range(0, len(pcm), 9600):
                chunk = base64.b64encode(pcm[i : i + 9600]).decode()
                await ws.send_json({"type": "input_audio_buffer.append", "audio": chunk})
            types = []
            while "conversation.item.input_audio_transcription.completed" not in types:
                types.append(json.loads((await ws.receive(timeout=20)).data)["type"])
            assert "input_audio_buffer.speech_started" in types

    # Plain http on the TLS port gets no answer, and a client that does not trust the
    # certificate refuses it.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(tls_server.url.replace("https://", "http://") + "/healthz") as r:
                await r.read()
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with http.get(f"{tls_server.url}/healthz") as r:
                await r.read()


def serve(tmp_path: Path, server_section: dict[str, object]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"server": {"port": 0, **server_section}}))
    return subprocess.run(
        [sys.executable, "-m", "signaling.cli", "serve", "--config", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_missing_certificate_stops_start_up(tmp_path: Path, cert: SelfSignedCert) -> None:
    missing = tmp_path / "nope.pem"
    done = serve(tmp_path, {"tls_cert_file": str(missing), "tls_key_file": str(cert.key_file)})
    assert done.returncode == 2, done.stderr
    assert f"server.tls_cert_file: cannot read {missing}: No such file or directory" in done.stderr


def test_unreadable_key_stops_start_up(tmp_path: Path, cert: SelfSignedCert) -> None:
    # A folder cannot be read as a file, even by root (who reads any file whatever its mode).
    folder = tmp_path / "key-folder"
    folder.mkdir()
    done = serve(tmp_path, {"tls_cert_file": str(cert.cert_file), "tls_key_file": str(folder)})
    assert done.returncode == 2, done.stderr
    assert f"server.tls_key_file: cannot read {folder}: Is a directory" in done.stderr


def test_key_of_another_certificate_stops_start_up(tmp_path: Path, cert: SelfSignedCert) -> None:
    other = make_test_cert(tmp_path / "other", ["127.0.0.1"])
    done = serve(
        tmp_path, {"tls_cert_file": str(cert.cert_file), "tls_key_file": str(other.key_file)}
    )
    assert done.returncode == 2, done.stderr
    assert "are not a PEM certificate chain and its private key" in done.stderr


def test_certificate_without_key_is_a_configuration_error(
    tmp_path: Path, cert: SelfSignedCert
) -> None:
    done = serve(tmp_path, {"tls_cert_file": str(cert.cert_file)})
    assert done.returncode == 2, done.stderr
    assert "server.tls_key_file: server.tls_cert_file and server.tls_key_file go together" in (
        done.stderr
    )
