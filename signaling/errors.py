"""JSON errors for every HTTP failure: ``{"error": {"type", "code", "message"}}``.

A bad request never takes the server down and never leaks a stack trace: the middleware
turns aiohttp's own HTTP errors (404, 405, 413, ...) and any unexpected exception into the
same JSON shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent import json_guard

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limit_exceeded",
    503: "unavailable",
}


class ApiError(Exception):
    """Raise from a handler to answer with a JSON error of this status and code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type_
        self.headers = headers or {}

    def response(self) -> web.Response:
        resp = json_error(self.status, self.code, self.message, self.type)
        resp.headers.update(self.headers)
        return resp


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; anything else is a 400."""
    try:
        # Depth-guarded: deep nesting made json.loads raise RecursionError, a 500.
        body = json_guard.loads(raw)
    except json_guard.JsonTooDeep as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    return body


def json_error(
    status: int, code: str, message: str, type_: str = "invalid_request_error"
) -> web.Response:
    body = {"error": {"type": type_, "code": code, "message": message}}
    return web.json_response(body, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Where the middleware leaves the code of the JSON error it answered (for metrics).
ERROR_CODE: web.RequestKey[str] = web.RequestKey("error_code", str)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
        if isinstance(response, web.HTTPException) and response.status >= 400:
            raise response  # a returned (not raised) aiohttp error: same JSON shape
        return response
    except ApiError as exc:
        request[ERROR_CODE] = exc.code
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _CODES.get(exc.status, "http_error")
        message = exc.reason if exc.status != 413 else "request body too large"
        resp = json_error(exc.status, code, message)
        for key in ("Allow", "Retry-After"):
            if key in exc.headers:
                resp.headers[key] = exc.headers[key]
        request[ERROR_CODE] = code
        return resp
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        request[ERROR_CODE] = "internal_error"
        return json_error(500, "internal_error", "internal server error", "server_error")
