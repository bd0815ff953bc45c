"""Configuration: defaults load, bad keys and values stop start-up naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Config, load_config
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_config_equals_defaults() -> None:
    assert load_config(REPO / "config.yaml", environ={}) == Config()


def test_config_is_frozen() -> None:
    cfg = load_config(None, environ={})
    with pytest.raises(AttributeError):
        cfg.vad.threshold = 0.9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("vad:\n  treshold: 0.5\n", "vad.treshold: unknown key"),
        ("vadd:\n  threshold: 0.5\n", "vadd: unknown key"),
        ("vad:\n  threshold: 2\n", "vad.threshold: must be in (0, 1)"),
        ("vad:\n  threshold: high\n", "vad.threshold: must be a number"),
        ("vad:\n  kind: webrtc\n", "vad.kind: must be one of silero, energy"),
        ("server:\n  port: 70000\n", "server.port: must be 0..65535"),
        ("server:\n  port: '80'\n", "server.port: must be an integer"),
        ("webrtc:\n  host_addresses: [not-an-ip]\n", "webrtc.host_addresses: 'not-an-ip'"),
        ("webrtc:\n  host_addresses: 127.0.0.1\n", None),
        ("segmenter:\n  max_utterance_s: 45\n", "segmenter.max_utterance_s: must be in [1, 30]"),
        ("engine:\n  kind: gpt\n", "engine.kind: must be one of embedded, voxtral"),
        ("audio:\n  idle_timeout_s: 0\n", "audio.idle_timeout_s: must be > 0"),
        ("webrtc:\n  ice_servers: [{urls: [http://x]}]\n", "webrtc.ice_servers.urls"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("vad: [1, 2]\n", "vad: must be a mapping"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str | None) -> None:
    path = write(tmp_path, text)
    if key is None:
        assert load_config(path, environ={}).webrtc.host_addresses == ("127.0.0.1",)
        return
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert key in str(err.value)


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "vad:\n  threshold: 0.6\nserver:\n  port: 9000\n")
    cfg = load_config(
        path,
        environ={
            "VOXTRAL_RTC_VAD__THRESHOLD": "0.7",
            "VOXTRAL_RTC_WEBRTC__HOST_ADDRESSES": "[127.0.0.1, '::1']",
            "VOXTRAL_RTC_ENGINE__KIND": "embedded",
            "UNRELATED": "x",
        },
    )
    assert cfg.vad.threshold == 0.7
    assert cfg.server.port == 9000
    assert cfg.webrtc.host_addresses == ("127.0.0.1", "::1")


def test_bad_environment_override_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"vad\.nope: unknown key"):
        load_config(None, environ={"VOXTRAL_RTC_VAD__NOPE": "1"})
    with pytest.raises(ConfigError, match="VOXTRAL_RTC_VAD"):
        load_config(None, environ={"VOXTRAL_RTC_VAD": "1"})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "vad: [unclosed\n"), environ={})


def test_cli_serve_reports_config_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write(tmp_path, "vad:\n  threshold: 5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "signaling.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "vad.threshold" in proc.stderr
    assert "Traceback" not in proc.stderr
