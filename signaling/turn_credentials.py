"""Short-lived TURN credentials for the page: coturn's REST scheme (``use-auth-secret``).

coturn with ``use-auth-secret`` and ``static-auth-secret=S`` accepts any username of the form
``<expiry unix time>:<anything>`` whose password is ``base64(HMAC-SHA1(S, username))``, until
that time. The server shares ``S`` with coturn and mints a fresh pair for every
``GET /api/config`` (one per call: the page fetches it as each call starts), so the page never
holds a password that outlives ``webrtc.turn_ttl_s``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from agent.config import WebRTCConfig


def turn_rest_credentials(secret: str, ttl_s: int, now: float, user: str) -> tuple[str, str]:
    """``(username, credential)`` valid until ``now + ttl_s`` for coturn's ``secret``."""
    username = f"{int(now) + ttl_s}:{user}"
    digest = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers_for_page(config: WebRTCConfig, now: float) -> list[dict[str, object]]:
    """The ``iceServers`` list the page passes to ``new RTCPeerConnection``: TURN entries get
    per-call credentials when ``webrtc.turn_secret`` is set, the configured ones otherwise."""
    minted: tuple[str, str] | None = None
    if config.turn_secret:
        # A random name per call: coturn's logs and quotas can tell the calls apart.
        minted = turn_rest_credentials(
            config.turn_secret, config.turn_ttl_s, now, secrets.token_hex(6)
        )
    out: list[dict[str, object]] = []
    for s in config.ice_servers:
        entry: dict[str, object] = {"urls": list(s.urls)}
        is_turn = any(u.startswith(("turn:", "turns:")) for u in s.urls)
        username, credential = minted if (minted and is_turn) else (s.username, s.credential)
        if username:
            entry["username"] = username
        if credential:
            entry["credential"] = credential
        out.append(entry)
    return out
