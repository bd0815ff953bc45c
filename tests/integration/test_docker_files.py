"""The Docker files cannot be built here (no Docker engine), so this checks what they name:
every ``VOXTRAL_RTC_*`` key (Dockerfile ENV and compose environment) is a configuration key
with a valid value, every path exists (build contexts, Dockerfiles, COPY sources, the config
the image runs; container paths under a COPY or a volume), and coturn's flags are ones Debian's
``turnserver`` accepts and agree with the server's TURN settings."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from agent.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER = REPO_ROOT / "docker"
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.scale.yaml"]
#: What the operator exports before ``docker compose up`` (docker/README.md).
OPERATOR_ENV = {
    "PUBLIC_IP": "203.0.113.10",
    "PRIVATE_IP": "10.0.0.5",
    "TURN_SECRET": "0123456789abcdef" * 4,
    "TLS_DIR": "/etc/voxtral-rtc/tls",
    "HF_HOME": "/srv/hf",
}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} is not set and has no default ({arg})")

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, text)


@dataclass
class Dockerfile:
    path: Path
    workdir: PurePosixPath = field(default_factory=lambda: PurePosixPath("/"))
    env: dict[str, str] = field(default_factory=dict)
    copies: list[tuple[list[str], PurePosixPath]] = field(default_factory=list)
    command: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        out = cls(path)
        text = re.sub(r"\\\n", " ", path.read_text())
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            op, _, rest = line.partition(" ")
            op = op.upper()
            if op == "WORKDIR":
                out.workdir = out.workdir / rest.strip()
            elif op == "ENV":
                for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                    out.env[key] = value.strip('"')
            elif op == "COPY":
                *sources, dest = rest.split()
                out.copies.append((sources, out.workdir / dest))
            elif op in ("CMD", "ENTRYPOINT"):
                out.command += json.loads(rest)
        return out

    def provides(self, container_path: str) -> bool:
        """Whether a COPY put something at (or above) ``container_path``."""
        target = PurePosixPath(container_path)
        for sources, dest in self.copies:
            for source in sources:
                placed = dest / source if str(dest).endswith("/") or len(sources) > 1 else dest
                placed = dest / Path(source).name if dest == self.workdir else placed
                if target == placed or placed in target.parents:
                    return True
        return False


def services() -> list[tuple[Path, str, dict[str, Any]]]:
    found = []
    for path in COMPOSE_FILES:
        compose = yaml.safe_load(interpolate(path.read_text(), OPERATOR_ENV))
        found += [(path, name, spec) for name, spec in compose["services"].items()]
    return found


def build_of(compose: Path, spec: dict[str, Any]) -> tuple[Path, Dockerfile]:
    context = (compose.parent / spec["build"]["context"]).resolve()
    dockerfile = context / spec["build"]["dockerfile"]
    assert context.is_dir(), context
    assert dockerfile.is_file(), dockerfile
    return context, Dockerfile.parse(dockerfile)


@pytest.mark.parametrize(("compose", "name", "spec"), services(), ids=lambda v: str(v)[-20:])
def test_service_names_real_files_and_config_keys(
    compose: Path, name: str, spec: dict[str, Any]
) -> None:
    context, dockerfile = build_of(compose, spec)
    for sources, _ in dockerfile.copies:
        for source in sources:
            assert (context / source).exists(), f"{dockerfile.path.name}: COPY {source}"
    if dockerfile.command[0] != "voxtral-rtc":
        return  # coturn: test_coturn_flags
    # The configuration the container starts with: the file its command names, then the
    # Dockerfile's ENV, then the compose environment (load_config validates all of it).
    config_file = dockerfile.command[dockerfile.command.index("--config") + 1]
    assert dockerfile.provides(str(dockerfile.workdir / config_file)), config_file
    env = {**dockerfile.env, **{k: str(v) for k, v in (spec.get("environment") or {}).items()}}
    assert all(k.startswith("VOXTRAL_RTC_") for k in env), env
    config = load_config(context / config_file, env)
    # Container paths the configuration names exist in the image or come from a volume.
    volumes = [PurePosixPath(v.split(":")[1]) for v in spec.get("volumes") or []]
    paths = [config.server.tls_cert_file, config.server.tls_key_file, config.server.web_dir]
    for path in filter(None, paths):
        mounted = any(v in PurePosixPath(path).parents for v in volumes)
        assert mounted or dockerfile.provides(path), f"{name}: {path} is in no COPY or volume"


def compose_services() -> dict[str, Any]:
    compose = yaml.safe_load(interpolate(COMPOSE_FILES[0].read_text(), OPERATOR_ENV))
    return dict(compose["services"])


def coturn_flags() -> dict[str, str]:
    flags = compose_services()["coturn"]["command"]
    return {f.split("=", 1)[0]: f.split("=", 1)[1] if "=" in f else "" for f in flags}


def test_server_and_coturn_agree() -> None:
    server_env = compose_services()["cpu"]["environment"]
    flags = coturn_flags()
    config = load_config(REPO_ROOT / "config.yaml", {k: str(v) for k, v in server_env.items()})
    assert flags["--static-auth-secret"] == config.webrtc.turn_secret == OPERATOR_ENV["TURN_SECRET"]
    assert "--use-auth-secret" in flags
    turn_urls = [u for s in config.webrtc.ice_servers for u in s.urls if u.startswith("turn:")]
    port = flags["--listening-port"]
    assert turn_urls and all(f"{OPERATOR_ENV['PUBLIC_IP']}:{port}?" in u for u in turn_urls)
    relays = range(int(flags["--min-port"]), int(flags["--max-port"]) + 1)
    first, last = config.webrtc.udp_ports
    assert not set(relays) & set(range(first, last + 1)), "the relay and ICE ranges overlap"
    assert config.webrtc.public_address == OPERATOR_ENV["PUBLIC_IP"] == flags["--external-ip"]


#: A host of its own for turnserver: coturn does not listen on loopback alone.
SETUP_HOST = (
    "ip link set lo up && ip link add eth0 type veth peer name eth1 && ip link set eth1 up && "
    f"ip addr add {OPERATOR_ENV['PRIVATE_IP']}/24 dev eth0 && ip link set eth0 up"
)


@pytest.mark.skipif(shutil.which("turnserver") is None, reason="coturn is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_coturn_flags_are_accepted_by_turnserver(tmp_path: Path) -> None:
    """Debian's turnserver (what Dockerfile.coturn installs) started with the compose file's
    flags, in a namespace of its own holding the host's private address: it must keep
    running (an unknown flag exits 255, and so does a host it cannot listen on)."""
    spec = compose_services()["coturn"]
    _, dockerfile = build_of(COMPOSE_FILES[0], spec)
    assert dockerfile.command == ["turnserver", "-n"]
    flags = [*dockerfile.command, *spec["command"], f"--pidfile={tmp_path / 'pid'}"]
    flags.append(f"--userdb={tmp_path / 'turndb'}")
    log = (tmp_path / "turn.log").open("wb")
    proc = subprocess.Popen(
        ["unshare", "-n", "--", "sh", "-c", f'{SETUP_HOST} && exec "$@"', "sh", *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(2.0)
        text = (tmp_path / "turn.log").read_text(errors="replace")
        assert proc.poll() is None, f"turnserver {flags} exited ({proc.returncode}):\n{text[:2000]}"
        for what in ("Listener", "Relay"):
            assert f"{what} address to use: {OPERATOR_ENV['PRIVATE_IP']}" in text, text[:3000]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
