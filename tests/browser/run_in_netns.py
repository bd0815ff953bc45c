"""Drive one browser call against a real server, inside a loopback-only network namespace.

``test_browser.py`` starts this script through ``unshare -n`` so that the server and Chromium
share a network namespace whose only interface is ``lo``: no packet of the call can leave the
machine, and aioice / Chromium gather only 127.0.0.1 candidates.

Steps: start the server (``python -m signaling.cli serve``) on a free port, wait for
``/readyz``, launch Debian's Chromium through Playwright with a fake microphone that plays
``--wav``, press Start, wait until the transcript holds the expected words, take a screenshot,
press Stop, and shut everything down. The outcome is printed as one JSON object on the last
line of stdout (everything else goes to files in ``--work-dir``), and the exit code is 0 even
when the call fails, so that the test can show the details.

Run by hand (as root) for debugging::

    unshare -n -- sh -c 'ip link set lo up && exec .venv/bin/python \
        tests/browser/run_in_netns.py --wav /tmp/padded.wav --work-dir /tmp/bt'
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"


def chromium_args(wav: Path, trusted_spki: str = "") -> list[str]:
    """The flags of DESIGN §6: a fake, auto-granted microphone playing ``wav`` once; with
    ``trusted_spki``, the test's TLS certificate (that key only) is trusted."""
    trust = [f"--ignore-certificate-errors-spki-list={trusted_spki}"] if trusted_spki else []
    return [
        *trust,
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        # Without it Chromium leaves 127.0.0.1 out of its ICE candidates (DESIGN §9).
        "--allow-loopback-in-peer-connection",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        "--no-sandbox",
    ]


class Deadline:
    """One overall time budget, shared by every wait below, so the whole run is bounded."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        remaining = max(0.0, self.end - time.monotonic())
        return remaining if cap is None else min(cap, remaining)


class Failure(Exception):
    """A step failed; ``stage`` names it in the JSON result."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def assert_loopback_only() -> None:
    # Refuse to run anywhere else: the promise of this test is that nothing leaves loopback.
    names = sorted(name for _, name in socket.if_nameindex())
    if names != ["lo"]:
        raise Failure("netns", f"expected a namespace with only 'lo', found {names}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(work_dir: Path, tls: tuple[str, str] | None = None) -> Path:
    # JSON is valid YAML, so no YAML writer is needed here.
    config: dict[str, Any] = {
        "webrtc": {"host_addresses": ["127.0.0.1"]},
        "audio": {"idle_timeout_s": 10},
    }
    if tls is not None:
        config["server"] = {"tls_cert_file": tls[0], "tls_key_file": tls[1]}
    path = work_dir / "config.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def start_server(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    try:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    finally:
        log.close()  # the child holds its own copy of the descriptor


def stop_server(proc: subprocess.Popen[bytes]) -> int | None:
    """Ends the server we started, by its PID: SIGTERM first (graceful), SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def wait_ready(
    base: str,
    proc: subprocess.Popen[bytes],
    deadline: Deadline,
    cap: float,
    context: ssl.SSLContext | None = None,
) -> float:
    """Polls ``/readyz`` until it answers 200 (``context``: the TLS trust for https); returns
    the seconds it took."""
    t0 = time.monotonic()
    limit = deadline.left(cap)
    last = "no answer"
    while time.monotonic() - t0 < limit:
        if proc.poll() is not None:
            raise Failure("server", f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2, context=context) as response:
                if response.status == 200:
                    return time.monotonic() - t0
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise Failure("server", f"/readyz not 200 after {limit:.0f} s (last: {last})")


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# Runs in the page: true once every expected word is in the final texts.
HAS_WORDS_JS = """(words) => {
  const text = [...document.querySelectorAll('#utterances .utterance .final')]
    .map((e) => e.textContent).join(' ').toLowerCase();
  const have = new Set(text.match(/[a-z']+/g) || []);
  return words.every((w) => have.has(w));
}"""

SNAPSHOT_JS = """() => ({
  state: document.querySelector('#state').dataset.state,
  speaking: document.querySelector('#speaking').dataset.active,
  error: document.querySelector('#error').hidden ? null
    : document.querySelector('#error').textContent.replace(/\\s+/g, ' ').trim(),
  utterances: [...document.querySelectorAll('#utterances .utterance')].map((e) => ({
    item_id: e.dataset.itemId,
    status: e.dataset.status,
    final: e.querySelector('.final').textContent,
    latency: e.querySelector('.latency').textContent,
    latency_title: e.querySelector('.latency').title,
  })),
})"""

# Installed before the page loads: every change of an utterance's grey (interim) or black
# (final) text, with the colour the browser renders it in, in order, as ``window.textLog``.
TEXT_LOG_JS = """(() => {
  window.textLog = [];
  const t0 = performance.now();
  const note = (span) => {
    const utt = span.closest('.utterance');
    const kind = span.classList.contains('final') ? 'final' : 'interim';
    const text = span.textContent;
    const id = utt.dataset.itemId;
    const last = window.textLog.findLast((e) => e.item_id === id && e.kind === kind);
    if (last ? last.text === text : !text) return;
    window.textLog.push({ms: Math.round(performance.now() - t0), item_id: id,
      kind, text, color: getComputedStyle(span).color});
  };
  new MutationObserver((records) => {
    for (const r of records) {
      const node = r.target.nodeType === Node.TEXT_NODE ? r.target.parentElement : r.target;
      const span = node && node.closest ? node.closest('.interim, .final') : null;
      if (span) note(span);
    }
  }).observe(document, {subtree: true, childList: true, characterData: true});
})()"""

# Installed before the page loads: every event the page receives on its data channel, in
# order, as ``window.eventLog`` (what the server said, to hold the page's rendering against).
EVENT_LOG_JS = """(() => {
  window.eventLog = [];
  const create = RTCPeerConnection.prototype.createDataChannel;
  RTCPeerConnection.prototype.createDataChannel = function (...args) {
    const channel = create.apply(this, args);
    channel.addEventListener('message', (ev) => {
      try { window.eventLog.push(JSON.parse(ev.data)); } catch (e) { /* not JSON: not ours */ }
    });
    return channel;
  };
})()"""

PENDING_JS = """() => !document.querySelector(
  '#utterances .utterance[data-status="listening"],'
  + '#utterances .utterance[data-status="transcribing"]')"""


def drive_browser(
    base: str,
    wav: Path,
    work_dir: Path,
    words: list[str],
    deadline: Deadline,
    result: dict[str, Any],
    trusted_spki: str = "",
) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    console: list[str] = result.setdefault("console", [])
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(work_dir / "profile"),  # a fresh profile every run
            executable_path=CHROMIUM,
            headless=True,
            args=chromium_args(wav, trusted_spki),
            viewport={"width": 1024, "height": 900},
            timeout=deadline.left(30) * 1000,
        )
        try:
            page = context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.add_init_script(TEXT_LOG_JS)
            page.add_init_script(EVENT_LOG_JS)
            page.set_default_timeout(10_000)
            page.goto(f"{base}/", wait_until="load", timeout=deadline.left(15) * 1000)
            result["title"] = page.title()
            result["origin"] = page.evaluate("() => location.origin")
            # getUserMedia exists only in a secure context (https, or localhost).
            result["secure_context"] = page.evaluate("() => window.isSecureContext")
            result["state_before"] = page.locator("#state").get_attribute("data-state")

            t_start = time.monotonic()
            page.click("#start")
            try:
                page.wait_for_function(
                    "() => ['connected', 'failed', 'closed'].includes("
                    "document.querySelector('#state').dataset.state)",
                    timeout=deadline.left(20) * 1000,
                )
                result["state_after_start"] = page.locator("#state").get_attribute("data-state")
                result["connect_s"] = round(time.monotonic() - t_start, 2)
                page.wait_for_function(
                    HAS_WORDS_JS, arg=words, timeout=deadline.left(60) * 1000, polling=200
                )
                result["words_s"] = round(time.monotonic() - t_start, 2)
                # Let any utterance still in flight settle so the screenshot shows final text.
                try:
                    page.wait_for_function(PENDING_JS, timeout=deadline.left(5) * 1000)
                except PlaywrightError:
                    pass
            except PlaywrightError as exc:
                result["stage"] = "transcript"
                result["error"] = f"waiting in the page: {str(exc).splitlines()[0]}"
            finally:
                result["page"] = page.evaluate(SNAPSHOT_JS)
                result["text_log"] = page.evaluate("() => window.textLog")
                result["events"] = page.evaluate("() => window.eventLog")
                shot = work_dir / "screenshot.png"
                page.screenshot(path=str(shot), full_page=True)
                result["screenshot"] = str(shot)

            page.click("#stop")
            page.wait_for_function(
                "() => document.querySelector('#state').dataset.state === 'closed'",
                timeout=deadline.left(5) * 1000,
            )
            result["state_after_stop"] = page.locator("#state").get_attribute("data-state")
            result["stop_disabled"] = page.locator("#stop").is_disabled()
            result["start_enabled"] = page.locator("#start").is_enabled()
        finally:
            context.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wav", type=Path, required=True, help="16-bit PCM WAV for the mic")
    parser.add_argument("--work-dir", type=Path, required=True, help="logs, profile, screenshot")
    parser.add_argument("--words", default="ever tried failed matter try again fail better")
    parser.add_argument("--deadline-s", type=float, default=160.0, help="budget for everything")
    parser.add_argument("--ready-timeout-s", type=float, default=90.0)
    parser.add_argument(
        "--server-cmd",
        default="",
        help="JSON list replacing the server command ({config} and {port} are filled in); "
        "for trying the page against another server",
    )
    parser.add_argument("--tls-cert", default="", help="serve https with this PEM certificate")
    parser.add_argument("--tls-key", default="", help="... and this PEM key")
    parser.add_argument("--trust-spki", default="", help="base64 SHA-256 of the cert's key")
    args = parser.parse_args()

    # SIGTERM (from the test's own timeout) must still run the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    deadline = Deadline(args.deadline_s)
    work_dir: Path = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"ok": False, "stage": "setup", "error": None}
    server: subprocess.Popen[bytes] | None = None
    log_path = work_dir / "server.log"
    try:
        assert_loopback_only()
        port = free_port()
        tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
        config = write_config(work_dir, tls)
        if args.server_cmd:
            cmd = [part.format(config=config, port=port) for part in json.loads(args.server_cmd)]
        else:
            cmd = [
                sys.executable, "-m", "signaling.cli", "serve",
                "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            ]  # fmt: skip
        base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        context = ssl.create_default_context(cafile=args.tls_cert) if tls else None
        result["stage"] = "server"
        server = start_server(cmd, log_path)
        result["server_pid"] = server.pid
        ready_s = wait_ready(base, server, deadline, args.ready_timeout_s, context)
        result["ready_s"] = round(ready_s, 2)

        result["stage"] = "browser"
        words = args.words.split()
        drive_browser(base, args.wav.resolve(), work_dir, words, deadline, result, args.trust_spki)
        if result["stage"] == "browser":
            result["stage"] = "done"
            result["ok"] = True
    except Failure as exc:
        result["stage"], result["error"] = exc.stage, str(exc)
    except Exception as exc:  # report anything else as the result instead of a bare traceback
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        if server is not None:
            result["server_exit"] = stop_server(server)
        result["server_log_tail"] = tail(log_path)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
