"""Download a ``file_url`` safely: the server must not become a proxy into its own network.

Guards, each against a known way of abusing a server that fetches URLs for its users:

- only ``http`` and ``https`` (no ``file:``, ``ftp:``, ``gopher:`` ...);
- every address the host resolves to is checked and private, loopback, link-local,
  multicast and reserved ones are refused unless ``limits.allow_private_urls`` is set; the
  check sits in the connector's resolver, so the connection goes to exactly the addresses
  that were checked (no second lookup a DNS-rebinding server could answer differently);
  literal IP hosts, which aiohttp never resolves, are checked before the request;
- redirects are followed by hand, at most ``limits.url_max_redirects``, and every hop's
  scheme and host are checked again;
- one deadline (``limits.url_timeout_s``) for the whole download, redirects included;
- the body is capped at ``limits.max_upload_bytes`` while it streams in (a lying or absent
  ``Content-Length`` changes nothing); no proxy from the environment, no cookies kept.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from agent.config import LimitsConfig
from agent.errors import AudioInputError

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 65_536
_USER_AGENT = "voxtral-rtc (file_url fetch)"


@dataclass(frozen=True)
class FetchOptions:
    max_bytes: int
    timeout_s: float
    max_redirects: int
    allow_private: bool

    @classmethod
    def from_limits(cls, limits: LimitsConfig, allow_private: bool | None = None) -> FetchOptions:
        return cls(
            max_bytes=limits.max_upload_bytes,
            timeout_s=limits.url_timeout_s,
            max_redirects=limits.url_max_redirects,
            allow_private=limits.allow_private_urls if allow_private is None else allow_private,
        )


async def fetch_url(url: str, options: FetchOptions) -> bytes:
    """The body of ``url`` (after at most ``max_redirects`` redirects), or ``AudioInputError``
    with code ``invalid_url``, ``url_not_allowed``, ``url_fetch_failed`` or ``file_too_large``.
    """
    current = _parse(url)
    connector = aiohttp.TCPConnector(
        resolver=_CheckingResolver(options.allow_private), use_dns_cache=False, force_close=True
    )
    async with aiohttp.ClientSession(
        connector=connector,
        trust_env=False,  # an HTTP(S)_PROXY in the environment would bypass the checks
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": _USER_AGENT, "Accept": "audio/*, video/*, */*"},
    ) as session:
        try:
            async with asyncio.timeout(options.timeout_s):
                for _hop in range(options.max_redirects + 1):
                    _check_literal_host(current, options.allow_private)
                    body, location = await _get(session, current, options.max_bytes)
                    if body is not None:
                        return body
                    assert location is not None
                    current = _parse(str(current.join(URL(location))), "redirect target")
        except TimeoutError:
            raise AudioInputError(
                f"file_url: no complete answer within {options.timeout_s:g} s "
                "(limits.url_timeout_s)",
                "url_fetch_failed",
            ) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.__cause__, AudioInputError):
                raise exc.__cause__ from None
            raise AudioInputError(
                f"file_url: cannot connect to {current.host}: {exc.strerror or exc}",
                "url_fetch_failed",
            ) from None
        except aiohttp.ClientError as exc:
            raise AudioInputError(f"file_url: download failed: {exc}", "url_fetch_failed") from None
    raise AudioInputError(
        f"file_url: more than {options.max_redirects} redirects (limits.url_max_redirects)",
        "url_fetch_failed",
    )


async def _get(
    session: aiohttp.ClientSession, url: URL, max_bytes: int
) -> tuple[bytes | None, str | None]:
    """One hop: ``(body, None)``, or ``(None, location)`` for a redirect."""
    async with session.get(url, allow_redirects=False) as resp:
        if resp.status in _REDIRECTS:
            location = resp.headers.get("Location")
            if not location:
                raise AudioInputError(
                    f"file_url: HTTP {resp.status} redirect without a Location", "url_fetch_failed"
                )
            return None, location
        if resp.status != 200:
            raise AudioInputError(
                f"file_url: the server answered HTTP {resp.status} {resp.reason or ''}".rstrip(),
                "url_fetch_failed",
            )
        if resp.content_length is not None and resp.content_length > max_bytes:
            raise _too_large(max_bytes)
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
        return b"".join(chunks), None


def _parse(raw: str, what: str = "file_url") -> URL:
    try:
        url = URL(raw.strip())
    except (ValueError, TypeError):
        raise AudioInputError(f"{what}: not a valid URL", "invalid_url") from None
    if url.scheme not in ("http", "https"):
        scheme = f"'{url.scheme}:'" if url.scheme else "no scheme"
        raise AudioInputError(
            f"{what}: only http and https URLs are fetched, got {scheme}", "invalid_url"
        )
    if not url.host:
        raise AudioInputError(f"{what}: the URL has no host", "invalid_url")
    return url


def _check_literal_host(url: URL, allow_private: bool) -> None:
    host = url.host or ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    _check_ip(ip, host, allow_private)


#: Ranges Python's ``is_global`` lets through but that reach no public host: the IETF
#: protocol assignments block (``is_private`` covers only parts of it) and IPv6 site-local.
_NOT_PUBLIC = (
    ipaddress.ip_network("192.0.0.0/24"),
    ipaddress.ip_network("fec0::/10"),
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo): a relay or the
    host's own stack delivers the packet there, so they are what must be checked."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def _is_public(ip: IPAddress) -> bool:
    if any(ip in net for net in _NOT_PUBLIC if net.version == ip.version):
        return False
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def _check_ip(ip: IPAddress, host: str, allow_private: bool) -> None:
    if allow_private:
        return
    if not _is_public(ip) or not all(_is_public(v4) for v4 in _embedded_ipv4(ip)):
        # The message names the host as the client wrote it, never what it resolved to:
        # echoing resolved addresses would map the server's internal network for them.
        raise AudioInputError(
            f"file_url: {host} is a private, loopback or link-local address, which this "
            "server does not fetch (limits.allow_private_urls is false)",
            "url_not_allowed",
        )


class _CheckingResolver(AbstractResolver):
    """Resolves like the system does, then refuses the host if any address is off-limits."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            _check_ip(ipaddress.ip_address(result["host"]), host, self._allow_private)
        return results

    async def close(self) -> None:
        await self._inner.close()


def _too_large(max_bytes: int) -> AudioInputError:
    return AudioInputError(
        f"the file at file_url is larger than this server accepts ({max_bytes} bytes, "
        "limits.max_upload_bytes)",
        "file_too_large",
    )
