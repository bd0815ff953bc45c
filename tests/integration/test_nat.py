"""Through a real NAT (``tests/support/netns.py``: namespaces, veth pairs, nftables): a caller
behind a home router's masquerade calls the server behind a cloud 1:1 NAT whose firewall lets
in only https and ``webrtc.udp_ports``, once directly (the server announces
``webrtc.public_address``) and once only through Debian's coturn with the per-call
credentials of ``/api/config`` (``iceTransportPolicy: "relay"``); with spoiled or expired
credentials coturn refuses. The server serves https with a certificate made here, and its UDP
sockets, read with ``ss`` while the calls run, stay in the range.

Needs root, ``ip``, ``nft`` and ``turnserver`` (scripts/test.sh installs them); skipped
otherwise. The server is the real ``voxtral-rtc serve`` with the embedded engine.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signaling.turn_credentials import turn_rest_credentials
from tests.browser.run_in_netns import start_server, stop_server, tail
from tests.browser.test_browser import BECKETT, KEYWORDS, write_padded_wav
from tests.support.netns import NatTopology, exec_in, missing_tools, udp_ports_of
from tests.support.tls_cert import make_test_cert

REPO_ROOT = Path(__file__).resolve().parents[2]
CALLER = Path(__file__).with_name("nat_caller.py")
HTTPS_PORT = 8443
UDP_PORTS = (41000, 41009)
TURN_PORT = 3478

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))


@dataclass
class Deployment:
    net: NatTopology
    server: subprocess.Popen[bytes]
    server_log: Path
    turn_log: Path
    secret: str
    ca: Path
    wav: Path

    @property
    def url(self) -> str:
        return f"https://{self.net.server_public}:{HTTPS_PORT}"

    def logs(self) -> str:
        return (
            f"--- server log ---\n{tail(self.server_log)}\n"
            f"--- coturn log ---\n{tail(self.turn_log, 3000)}"
        )


def coturn_config(net: NatTopology, secret: str, work: Path) -> Path:
    path = work / "turnserver.conf"
    path.write_text(
        "\n".join(
            [
                f"listening-ip={net.turn_ip}",
                f"relay-ip={net.turn_ip}",
                f"listening-port={TURN_PORT}",
                "min-port=49160",
                "max-port=49200",
                "use-auth-secret",
                f"static-auth-secret={secret}",
                "realm=voxtral.test",
                "fingerprint",
                "no-tls",
                "no-dtls",
                "no-cli",
                "no-tcp-relay",
                "no-multicast-peers",
                f"userdb={work / 'turndb'}",
                f"pidfile={work / 'turnserver.pid'}",
                "log-file=stdout",
                "simple-log",
                "verbose",
            ]
        )
        + "\n"
    )
    return path


def server_config(net: NatTopology, secret: str, cert_dir: Path, work: Path) -> Path:
    cert = make_test_cert(cert_dir, [net.server_public])  # the name callers use
    config = {
        "server": {
            "host": net.server_ip,
            "port": HTTPS_PORT,
            "tls_cert_file": str(cert.cert_file),
            "tls_key_file": str(cert.key_file),
        },
        "webrtc": {
            "udp_ports": list(UDP_PORTS),
            "public_address": net.server_public,
            "ice_servers": [
                {"urls": [f"stun:{net.turn_ip}:{TURN_PORT}"]},
                {"urls": [f"turn:{net.turn_ip}:{TURN_PORT}?transport=udp"]},
            ],
            "turn_secret": secret,
            "turn_ttl_s": 600,
        },
        "audio": {"idle_timeout_s": 10},
    }
    path = work / "config.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("nat")
    net = NatTopology(f"{os.getpid() % 100000}", HTTPS_PORT, UDP_PORTS)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        net.build()
        secret = secrets.token_hex(16)
        turn_log = work / "coturn.log"
        conf = coturn_config(net, secret, work)
        procs.append(start_server([*exec_in(net.turn), "turnserver", "-c", str(conf)], turn_log))
        config = server_config(net, secret, work / "tls", work)
        server_log = work / "server.log"
        cmd = [*exec_in(net.server), sys.executable, "-m", "signaling.cli", "serve"]
        server = start_server([*cmd, "--config", str(config)], server_log)
        procs.append(server)
        wav = work / "beckett_padded.wav"
        write_padded_wav(BECKETT, wav)
        yield Deployment(net, server, server_log, turn_log, secret, work / "tls" / "cert.pem", wav)
    finally:
        for proc in reversed(procs):
            stop_server(proc)
        net.close()


def run_caller(d: Deployment, *args: str, watch_ports: bool = False) -> dict[str, Any]:
    """Runs ``nat_caller.py`` in the caller's namespace; with ``watch_ports``, the server's
    UDP ports seen by ``ss`` meanwhile are in the result's ``server_udp_ports``."""
    cmd = [
        *exec_in(d.net.caller), sys.executable, str(CALLER),
        "--url", d.url, "--ca", str(d.ca), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    seen: set[int] = set()
    deadline = time.monotonic() + 150
    while proc.poll() is None and time.monotonic() < deadline:
        if watch_ports:
            seen |= udp_ports_of(d.net.server, d.server.pid)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=10)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no result from the caller\n{out}\n{err[-3000:]}\n{d.logs()}"
    result: dict[str, Any] = json.loads(lines[-1])
    result["server_udp_ports"] = sorted(seen)
    shown = {k: v for k, v in result.items() if k != "finals"}
    print(f"{' '.join(args)}: {json.dumps(shown)}")  # shown with -s, and on a failure
    result["stderr"] = err[-2000:]
    return result


def explain(result: dict[str, Any], d: Deployment) -> str:
    return f"{json.dumps(result, indent=2)}\n{d.logs()}"


def heard(result: dict[str, Any]) -> set[str]:
    return set(" ".join(result.get("finals", [])).lower().replace(".", " ").split())


def in_range(port: int) -> bool:
    return UDP_PORTS[0] <= port <= UDP_PORTS[1]


def test_caller_behind_nat_reaches_the_announced_public_address(d: Deployment) -> None:
    result = run_caller(
        d, "--wav", str(d.wav), "--words", " ".join(KEYWORDS), "--policy", "all", watch_ports=True
    )
    detail = explain(result, d)
    assert result["ok"] and result.get("offer_status") == 200, detail
    assert result["connected"] and not result.get("timed_out"), detail
    # The server's candidates name its public address, never the private one.
    answered = result["answered"]
    assert answered and all(f" {d.net.server_public}:" in c for c in answered), detail
    assert all(in_range(int(c.rsplit(":", 1)[1])) for c in answered), detail
    # ICE chose the server's public address and a port of the range.
    remote_ip, remote_port = result["pair"]["remote"][1:]
    assert remote_ip == d.net.server_public and in_range(remote_port), detail
    assert result["pair"]["local"][0] != "relay", detail
    missing = [w for w in KEYWORDS if w not in heard(result)]
    assert not missing, f"missing {missing}\n{detail}"
    # Every UDP socket the server had open during the call was in the range.
    ports = result["server_udp_ports"]
    assert ports and all(in_range(p) for p in ports), detail


def test_relay_only_caller_reaches_the_server_through_coturn(d: Deployment) -> None:
    result = run_caller(
        d, "--wav", str(d.wav), "--words", " ".join(KEYWORDS), "--policy", "relay",
        watch_ports=True,
    )  # fmt: skip
    detail = explain(result, d)
    assert result["ok"] and result.get("offer_status") == 200, detail
    assert result["offered"] == ["relay"], detail  # the caller showed no address of its own
    assert result["connected"] and not result.get("timed_out"), detail
    local_type, local_ip, _ = result["pair"]["local"]
    assert (local_type, local_ip) == ("relay", d.net.turn_ip), detail
    assert result["pair"]["remote"][1] == d.net.server_public, detail
    expiry, _, user = result["turn_username"].partition(":")
    assert 0 < int(expiry) - time.time() <= 600 and user, detail  # short-lived, per call
    missing = [w for w in KEYWORDS if w not in heard(result)]
    assert not missing, f"missing {missing}\n{detail}"
    ports = result["server_udp_ports"]
    assert ports and all(in_range(p) for p in ports), detail


def test_relay_only_caller_without_valid_credentials_cannot_call(d: Deployment) -> None:
    result = run_caller(
        d, "--wav", str(d.wav), "--words", " ".join(KEYWORDS), "--policy", "relay",
        "--bad-credential", "--timeout-s", "15",
    )  # fmt: skip
    detail = explain(result, d)
    assert result["ok"], detail
    assert result.get("offered") == [], detail  # coturn gave no relay: nothing to offer
    assert not result.get("connected") and not result.get("finals"), detail


def test_coturn_takes_minted_credentials_and_refuses_others(d: Deployment) -> None:
    now = time.time()
    expired = turn_rest_credentials(d.secret, -60, now, "late")  # signed right, out of date
    forged = turn_rest_credentials("not-the-secret", 600, now, "forger")
    result = run_caller(d, "--mode", "probe", "--probe", ":".join(expired), "--probe",
                        ":".join(forged))  # fmt: skip
    detail = explain(result, d)
    assert result["ok"], detail
    assert result["minted"]["ok"] and result["minted"]["relayed"][0] == d.net.turn_ip, detail
    assert not result["probe0"]["ok"] and "401" in result["probe0"]["error"], detail
    assert not result["probe1"]["ok"] and "401" in result["probe1"]["error"], detail


@pytest.fixture
def d(deployment: Deployment) -> Deployment:
    if deployment.server.poll() is not None:
        pytest.fail(f"the server exited ({deployment.server.returncode})\n{deployment.logs()}")
    return deployment
