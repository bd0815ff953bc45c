"""Who may use the Twilio routes: Twilio's request signatures, or the server's bearer tokens.

Twilio cannot send our ``Authorization`` header, so the security middleware leaves
``/v1/twilio/media-stream`` and ``/v1/twilio/voice`` to this module:

- with ``telephony.twilio_auth_token`` set, both must carry a valid ``X-Twilio-Signature``
  (checked by the ``twilio`` package's own ``RequestValidator``: HMAC-SHA1 of the URL Twilio
  requested, plus the POSTed form of the webhook; the media stream's upgrade is signed over
  its ``wss://`` URL with no parameters), else 403 and nothing starts. The URL is the one
  Twilio used: ``telephony.public_url`` when a proxy stands between (TLS ends there, the
  host differs), else this request's own ``Host``.
- without it, the server's bearer tokens apply (when it has any). The TwiML webhook takes
  the token as HTTP Basic credentials, the password being the token (Twilio sends those for
  a webhook URL written ``https://any:TOKEN@host/v1/twilio/voice``). A media stream cannot
  carry a header at all: its token comes as a ``<Parameter name="token">`` of the
  ``<Stream>``, which Twilio delivers only in the ``start`` message, after the upgrade. So
  such an upgrade is accepted, holds a call slot, and must send a ``start`` with a valid
  token within ``telephony.start_timeout_s`` or it is closed (1008) with nothing started;
  an upgrade that does carry an ``Authorization`` header is judged on it at once (401).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from urllib.parse import urlsplit

from aiohttp import web
from twilio.request_validator import RequestValidator

from agent.config import Config
from signaling.errors import ApiError
from signaling.security import Security

SIGNATURE_HEADER = "X-Twilio-Signature"
#: The ``<Parameter>`` name that carries a bearer token to a media stream.
TOKEN_PARAMETER = "token"


class TwilioAuth:
    """The Twilio routes' policy, built once per app from its config."""

    def __init__(self, config: Config) -> None:
        token = config.telephony.twilio_auth_token
        self._validator = RequestValidator(token) if token else None
        self._security = Security(config.server)
        public = config.telephony.public_url
        self._public = urlsplit(public) if public else None

    @property
    def signed(self) -> bool:
        """Whether Twilio's signatures decide (``telephony.twilio_auth_token`` is set)."""
        return self._validator is not None

    @property
    def tokens(self) -> bool:
        """Whether the server has bearer tokens."""
        return self._security.auth_required

    # -- URLs as Twilio sees them ------------------------------------------------------------

    def public_url(self, request: web.Request, scheme: str) -> str:
        """The URL of ``request`` as Twilio reached it, with ``scheme`` (``https``/``wss``)."""
        return f"{scheme}://{self._host(request)}{request.path_qs}"

    def stream_url(self, request: web.Request, path: str) -> str:
        """The ``wss://`` URL of ``path`` on this server, for a TwiML ``<Stream>``."""
        return f"wss://{self._host(request)}{path}"

    def _host(self, request: web.Request) -> str:
        return self._public.netloc if self._public is not None else request.host

    def _webhook_scheme(self, request: web.Request) -> str:
        if self._public is not None:
            return self._public.scheme
        return request.headers.get("X-Forwarded-Proto", request.scheme)

    # -- checks -----------------------------------------------------------------------------

    def check_stream_upgrade(self, request: web.Request) -> bool:
        """Refuse a media stream's upgrade that cannot be Twilio's (403) or carries a bad
        token (401). ``True``: authorized now; ``False``: its ``start`` must bring a token."""
        if self._validator is not None:
            # Twilio signs a stream's wss:// URL whatever scheme the proxy hands on.
            self._check_signature(request, self.public_url(request, "wss"), {})
            return True
        if not self.tokens:
            return True
        header = request.headers.get("Authorization")
        if header is None:
            return False
        if not self._security.token_ok(header):
            raise _unauthorized()
        return True

    async def check_webhook(self, request: web.Request) -> Mapping[str, str]:
        """Refuse a TwiML webhook request that cannot be Twilio's or lacks a token; the
        token it authenticated with (for the ``<Stream>``'s ``<Parameter>``), or ``{}``."""
        form = await request.post()
        if self._validator is not None:
            url = self.public_url(request, self._webhook_scheme(request))
            self._check_signature(request, url, form)
            return {}
        if not self.tokens:
            return {}
        header = request.headers.get("Authorization", "")
        token = _basic_password(header) or _bearer(header)
        if not token or not self._security.token_ok(f"Bearer {token}"):
            raise _unauthorized(basic=True)
        return {TOKEN_PARAMETER: token}

    def start_token_ok(self, parameters: Mapping[str, str]) -> bool:
        """Whether a stream's ``start`` parameters carry one of the server's tokens."""
        token = parameters.get(TOKEN_PARAMETER, "")
        return bool(token) and self._security.token_ok(f"Bearer {token}")

    def _check_signature(self, request: web.Request, url: str, params: object) -> None:
        assert self._validator is not None
        signature = request.headers.get(SIGNATURE_HEADER, "")
        if not signature or not self._validator.validate(url, params, signature):
            raise ApiError(
                403,
                "invalid_signature",
                f"a valid {SIGNATURE_HEADER} is required (telephony.twilio_auth_token)",
                type_="authentication_error",
            )


def _basic_password(header: str | None) -> str | None:
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return decoded.partition(":")[2] or None


def _bearer(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def _unauthorized(basic: bool = False) -> ApiError:
    # Twilio sends a webhook's Basic credentials only once challenged for them.
    challenge = 'Basic realm="voxtral-rtc", ' if basic else ""
    return ApiError(
        401,
        "invalid_token",
        "a valid bearer token is required",
        type_="authentication_error",
        headers={"WWW-Authenticate": challenge + 'Bearer realm="voxtral-rtc"'},
    )
