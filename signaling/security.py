"""Bearer-token auth and the CORS allow-list for the API paths.

- ``server.auth_tokens``: when set, ``/api/*``, ``/v1/*`` and ``/metrics`` need
  ``Authorization: Bearer <token>``; anything else gets ``401`` with
  ``WWW-Authenticate: Bearer``. Tokens are compared in constant time (SHA-256 digests, every
  token checked). The page, its files, ``/healthz`` and ``/readyz`` stay open: they hold no
  secret, and orchestrators probe them without credentials.
- WebSockets (``/v1/realtime``): browsers cannot set headers on them, so the token may also
  come as the subprotocol ``openai-insecure-api-key.<token>``, as OpenAI accepts it.
- ``/v1/twilio/media-stream`` and ``/v1/twilio/voice`` are checked by their routes
  (``signaling.twilio_auth``): Twilio's signature, or a token where Twilio can carry one.
- ``server.cors_origins``: pages served from these origins may call ``/api/*`` and ``/v1/*``
  (``*`` = any origin). Only a listed origin gets ``Access-Control-Allow-Origin``; a
  preflight (``OPTIONS``) from any other origin gets ``403``. Empty = same origin only.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from agent.config import ServerConfig
from signaling.errors import ApiError, Handler

#: Paths behind the token (when tokens are configured).
AUTH_PREFIXES = ("/api/", "/v1/", "/metrics")
#: Paths whose routes check who calls them themselves (``signaling.twilio_auth``): Twilio
#: cannot send our bearer token, it signs its requests or brings the token another way.
SELF_AUTHENTICATED = frozenset({"/v1/twilio/media-stream", "/v1/twilio/voice"})
#: Paths a page from another origin may call (when listed in ``server.cors_origins``).
CORS_PREFIXES = ("/api/", "/v1/")
ALLOW_METHODS = "GET, POST, PATCH, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type"
PREFLIGHT_MAX_AGE_S = "600"
#: The subprotocol prefix that carries a token on a browser's WebSocket.
API_KEY_PROTOCOL = "openai-insecure-api-key."


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class Security:
    """The auth and CORS policy of one app, built from ``server`` config."""

    def __init__(self, config: ServerConfig) -> None:
        self._digests = tuple(_digest(t) for t in config.auth_tokens)
        self._origins = frozenset(config.cors_origins)

    @property
    def auth_required(self) -> bool:
        return bool(self._digests)

    def token_ok(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of the tokens."""
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        got = _digest(token)
        ok = False
        for digest in self._digests:  # no early exit: the time does not depend on which
            ok |= hmac.compare_digest(got, digest)
        return ok

    def allowed_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``, or ``None``."""
        if not origin:
            return None
        if "*" in self._origins:
            return "*"
        return origin if origin in self._origins else None

    # -- aiohttp glue --------------------------------------------------------------------

    def middleware(self) -> web.middleware:  # type: ignore[valid-type]
        """Answers preflights, then checks the token. Runs inside the JSON error middleware."""

        @web.middleware
        async def security_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            path = request.path
            if request.method == "OPTIONS" and path.startswith(CORS_PREFIXES):
                return self._preflight(request)
            if (
                self.auth_required
                and path.startswith(AUTH_PREFIXES)
                and path not in SELF_AUTHENTICATED
            ):
                header = request.headers.get("Authorization") or _protocol_token(request)
                if not self.token_ok(header):
                    challenge = 'Bearer realm="voxtral-rtc"'
                    if header:
                        challenge += ', error="invalid_token"'
                    raise ApiError(
                        401,
                        "invalid_token" if header else "unauthorized",
                        "a valid bearer token is required (Authorization: Bearer <token>)",
                        type_="authentication_error",
                        headers={"WWW-Authenticate": challenge},
                    )
            return await handler(request)

        return security_middleware

    def _preflight(self, request: web.Request) -> web.StreamResponse:
        allowed = self.allowed_origin(request.headers.get("Origin"))
        if allowed is None:
            raise ApiError(
                403, "origin_not_allowed", "this origin may not call the API (server.cors_origins)"
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": allowed,
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_S,
            },
        )

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """CORS headers on every API answer, errors and streamed answers included (this runs
        just before the headers leave, which a middleware cannot promise for a stream)."""
        if not request.path.startswith(CORS_PREFIXES):
            return
        allowed = self.allowed_origin(request.headers.get("Origin"))
        if allowed is not None:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        if self._origins:
            response.headers.add("Vary", "Origin")


def _protocol_token(request: web.Request) -> str | None:
    """``Bearer <token>`` from a WebSocket upgrade's ``openai-insecure-api-key.<token>``
    subprotocol, if it has one."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return None
    for protocol in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        protocol = protocol.strip()
        if protocol.startswith(API_KEY_PROTOCOL):
            return "Bearer " + protocol[len(API_KEY_PROTOCOL) :]
    return None
