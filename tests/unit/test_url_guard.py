"""file_url guards that need no network: schemes, and private, loopback, link-local and
mapped addresses refused before any connection (names through the checking resolver)."""

from __future__ import annotations

import pytest

from agent.config import LimitsConfig
from agent.errors import AudioInputError
from signaling.url_fetch import FetchOptions, fetch_url

DEFAULT = FetchOptions.from_limits(LimitsConfig())


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.wav",
        "http://10.1.2.3/a.wav",
        "http://192.168.0.10:8080/a.wav",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata service
        "http://100.64.0.1/a.wav",  # carrier-grade NAT, not global
        "http://0.0.0.0/a.wav",
        "http://[::1]/a.wav",
        "http://[::ffff:127.0.0.1]/a.wav",
        "http://[fe80::1]/a.wav",
        "http://localhost:9/a.wav",  # a name: refused after resolving
        "http://[2002:c0a8:101::1]/a.wav",  # 6to4 carrying 192.168.1.1
        "http://[2002:7f00:1::1]/a.wav",  # 6to4 carrying 127.0.0.1
        "http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/a.wav",  # Teredo to 10.0.0.1
        "http://[fec0::1]/a.wav",  # IPv6 site-local
        "http://192.0.0.9/a.wav",  # IETF protocol assignments, not a public host
    ],
)
async def test_private_addresses_are_refused(url: str) -> None:
    with pytest.raises(AudioInputError) as info:
        await fetch_url(url, DEFAULT)
    assert info.value.code == "url_not_allowed"
    assert "limits.allow_private_urls" in str(info.value)


async def test_refusal_does_not_echo_the_resolved_address() -> None:
    """A name is refused by what it resolves to, but the answer names only the host: the
    addresses of the server's own network are not the client's business."""
    with pytest.raises(AudioInputError) as info:
        await fetch_url("http://localhost:9/a.wav", DEFAULT)
    message = str(info.value)
    assert "localhost" in message
    assert "127.0.0.1" not in message and "::1" not in message


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.wav", "gopher://x/", "//x/a.wav", "a.wav"]
)
async def test_only_http_and_https(url: str) -> None:
    with pytest.raises(AudioInputError) as info:
        await fetch_url(url, DEFAULT)
    assert info.value.code == "invalid_url"
    assert "only http and https" in str(info.value)
