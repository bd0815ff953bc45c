"""``voxtral-rtc transcribe``: a file, stdin and a URL, in process with the real engine."""

from __future__ import annotations

import functools
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from signaling.cli import main
from tests.conftest import BECKETT, BECKETT_PHRASES, BECKETT_REGIONS, normalise
from tests.support.audio_files import encode, wav_bytes

REFERENCE = " ".join(BECKETT_PHRASES)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A stdlib HTTP server on 127.0.0.1 serving a folder with beckett.mp3."""
    root = tmp_path_factory.mktemp("www")
    audio = np.frombuffer(BECKETT.read_bytes()[44:], dtype="<i2").astype(np.float32) / 32768
    (root / "beckett.mp3").write_bytes(encode(audio, "mp3"))
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


def test_file_to_srt_with_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("engine:\n  cpu_threads: 2\n")
    out = tmp_path / "out.srt"
    argv = ["transcribe", str(BECKETT), "--format", "srt", "-o", str(out), "--config", str(config)]
    assert main(argv) == 0
    srt = out.read_text()
    cues = [block.splitlines() for block in srt.strip().split("\n\n")]
    assert [c[0] for c in cues] == [str(i) for i in range(1, 7)]
    assert [normalise(c[2]) for c in cues] == BECKETT_PHRASES
    for cue, (ref_start, _) in zip(cues, BECKETT_REGIONS, strict=True):
        h, m, rest = cue[1].split(" --> ")[0].split(":")
        assert abs(float(rest.replace(",", ".")) + 60 * int(m) + 3600 * int(h) - ref_start) < 0.2
    assert capsys.readouterr().out == ""


def test_stdin_with_progress(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    beckett_audio: npt.NDArray[np.float32],
) -> None:
    gap = np.zeros(16_000 * 3, dtype=np.float32)
    long_audio = np.concatenate([beckett_audio, gap, beckett_audio, gap, beckett_audio])  # 36 s

    class _Stdin:
        buffer = io.BytesIO(wav_bytes(long_audio))

    monkeypatch.setattr("sys.stdin", _Stdin())
    assert main(["transcribe", "-", "--format", "text", "--language", "en"]) == 0
    captured = capsys.readouterr()
    text = normalise(captured.out)
    for phrase in BECKETT_PHRASES:
        assert text.count(phrase) >= 2, text
    assert "finding speech" in captured.err and "transcribing" in captured.err
    assert "100%" in captured.err


def test_url_is_fetched(http_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["transcribe", http_dir + "/beckett.mp3", "--format", "json", "-q"]) == 0
    captured = capsys.readouterr()
    assert normalise(json.loads(captured.out)["text"]) == REFERENCE
    assert captured.err == ""


@pytest.mark.parametrize(
    ("source", "message"),
    [("/no/such/file.wav", "no such file"), (__file__, "not a supported audio file")],
)
def test_bad_input_fails_before_loading_the_engine(
    source: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["transcribe", source]) == 1
    assert message in capsys.readouterr().err
