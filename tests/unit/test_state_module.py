"""The server state is a leaf: importing it pulls in no route module and not the app, so
the routes and the app can all import it without a cycle."""

from __future__ import annotations

import subprocess
import sys

ROUTE_MODULES = (
    "signaling.app",
    "signaling.routes",
    "signaling.transcriptions",
    "signaling.realtime",
)


def test_signaling_state_imports_no_route_module() -> None:
    code = (
        "import sys, signaling.state; "
        f"print(sorted(m for m in {ROUTE_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_session_core_imports_no_transport() -> None:
    code = (
        "import sys, agent.session; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiortc', 'aiohttp')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
