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
    ],
)
async def test_private_addresses_are_refused(url: str) -> None:
    with pytest.raises(AudioInputError) as info:
        await fetch_url(url, DEFAULT)
    assert info.value.code == "url_not_allowed"
    assert "limits.allow_private_urls" in str(info.value)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.wav", "gopher://x/", "//x/a.wav", "a.wav"]
)
async def test_only_http_and_https(url: str) -> None:
    with pytest.raises(AudioInputError) as info:
        await fetch_url(url, DEFAULT)
    assert info.value.code == "invalid_url"
    assert "only http and https" in str(info.value)
