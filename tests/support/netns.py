"""Networks of our own for the tests, built as root: network namespaces joined by veth pairs
and a bridge, with nftables NAT in the routers. Nothing leaves the machine: every address is a
documentation range (RFC 5737) or private, and only exists inside these namespaces.

``NatTopology`` is the deployment the README describes, in miniature::

    caller 192.168.7.2 ─ home NAT ─┐                   ┌─ cloud 1:1 NAT ─ server 10.77.0.2
      (masquerade, 203.0.113.7)    ├─ "internet" bridge ┤   (203.0.113.10 <-> 10.77.0.2,
                                   │  203.0.113.0/24    │    lets in tcp <https> and the
                     coturn 203.0.113.3 ───────────────┘    udp range only)

The caller cannot reach 10.77.0.2 (nothing routes to it but the cloud NAT), the server cannot
reach 192.168.7.2; what gets through is what the NATs let through.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


def missing_tools() -> str | None:
    """Why the namespace tests cannot run here, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "needs root (ip netns, nftables): CI runs as root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("turnserver", "coturn")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install {package}; scripts/test.sh does)"
    return None


def sh(*cmd: str, input_text: str | None = None) -> str:
    done = subprocess.run(
        cmd, input=input_text, capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@dataclass
class Namespaces:
    """Named network namespaces, deleted (with their links) by ``close``."""

    tag: str
    names: list[str] = field(default_factory=list)

    def add(self, role: str) -> str:
        name = f"vx{role}-{self.tag}"
        sh("ip", "netns", "add", name)
        self.names.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        sh("ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
        sh("ip", "-n", a, "link", "set", a_if, "up")
        sh("ip", "-n", b, "link", "set", b_if, "up")

    def close(self) -> None:
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.names.clear()


def exec_in(ns: str) -> list[str]:
    """The command prefix that runs a program inside ``ns`` (it keeps the program's PID)."""
    return ["ip", "netns", "exec", ns]


@dataclass
class NatTopology:
    """The picture above; ``build`` it, ``close`` it."""

    tag: str
    https_port: int
    udp_ports: tuple[int, int]
    caller_ip: str = "192.168.7.2"
    home_public: str = "203.0.113.7"
    server_ip: str = "10.77.0.2"
    server_public: str = "203.0.113.10"
    turn_ip: str = "203.0.113.3"
    ns: Namespaces = field(init=False)
    caller: str = field(init=False, default="")
    server: str = field(init=False, default="")
    turn: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.ns = Namespaces(self.tag)

    def build(self) -> NatTopology:
        ns = self.ns
        internet, home, cloud = ns.add("net"), ns.add("home"), ns.add("cloud")
        self.caller, self.server, self.turn = ns.add("caller"), ns.add("server"), ns.add("turn")
        sh("ip", "-n", internet, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", internet, "link", "set", "br0", "up")
        for where, port in ((home, "p-home"), (cloud, "p-cloud"), (self.turn, "p-turn")):
            ns.veth(where, "wan" if where != self.turn else "eth0", internet, port)
            sh("ip", "-n", internet, "link", "set", port, "master", "br0")
        addr = {home: self.home_public, cloud: self.server_public, self.turn: self.turn_ip}
        for where, ip in addr.items():
            dev = "eth0" if where == self.turn else "wan"
            sh("ip", "-n", where, "addr", "add", f"{ip}/24", "dev", dev)

        ns.veth(self.caller, "eth0", home, "lan")
        sh("ip", "-n", home, "addr", "add", "192.168.7.1/24", "dev", "lan")
        sh("ip", "-n", self.caller, "addr", "add", f"{self.caller_ip}/24", "dev", "eth0")
        sh("ip", "-n", self.caller, "route", "add", "default", "via", "192.168.7.1")

        ns.veth(self.server, "eth0", cloud, "lan")
        sh("ip", "-n", cloud, "addr", "add", "10.77.0.1/24", "dev", "lan")
        sh("ip", "-n", self.server, "addr", "add", f"{self.server_ip}/24", "dev", "eth0")
        sh("ip", "-n", self.server, "route", "add", "default", "via", "10.77.0.1")

        for router in (home, cloud):
            sh(*exec_in(router), "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # A home router: everything out through one address, nothing in unless it answers.
        sh(
            *exec_in(home),
            "nft",
            "-f",
            "-",
            input_text="""
table ip nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" masquerade
  }
}
table ip filter {
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan" oifname "wan" accept
  }
}
""",
        )
        first, last = self.udp_ports
        # A cloud VM's 1:1 NAT, with the firewall the README asks for: https and the UDP range.
        sh(
            *exec_in(cloud),
            "nft",
            "-f",
            "-",
            input_text=f"""
table ip nat {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "wan" ip daddr {self.server_public} dnat to {self.server_ip}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" ip saddr {self.server_ip} snat to {self.server_public}
  }}
}}
table ip filter {{
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan" oifname "wan" accept
    iifname "wan" ip daddr {self.server_ip} tcp dport {self.https_port} accept
    iifname "wan" ip daddr {self.server_ip} udp dport {first}-{last} accept
  }}
}}
""",
        )
        return self

    def close(self) -> None:
        self.ns.close()


def udp_ports_of(ns: str, pid: int) -> set[int]:
    """The local ports of the UDP sockets process ``pid`` has open in ``ns`` (from ``ss``)."""
    out = sh(*exec_in(ns), "ss", "-H", "-u", "-a", "-n", "-p")
    ports = set()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            local = line.split()[3]  # State Recv-Q Send-Q Local:Port Peer:Port Process
            ports.add(int(local.rsplit(":", 1)[1]))
    return ports
