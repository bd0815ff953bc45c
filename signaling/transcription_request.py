"""Read a ``POST /v1/audio/transcriptions`` request into a small frozen value.

Three body shapes are accepted:

- ``multipart/form-data`` (OpenAI's SDK, curl ``-F``): a ``file`` upload or a ``file_url``,
  plus ``model``, ``language``, ``prompt``, ``response_format``,
  ``timestamp_granularities[]``, ``stream``, ``temperature``;
- ``application/json``: the same fields, with the audio as base64 (plain or a
  ``data:audio/...;base64,`` URL) in ``audio`` or ``file``, or mistral-common's
  ``TranscriptionRequest`` shape (``"audio": {"data": base64}``), or a URL in ``file_url``
  (also ``audio_url`` / ``"audio": {"url": ...}``);
- ``application/x-www-form-urlencoded`` with a ``file_url``.

The body is read from the stream with this route's own cap (``limits.max_upload_bytes``),
not the application's small ``client_max_size``, which keeps guarding ``/api/*``, and at a
minimum pace (``limits.upload_min_bytes_per_s`` after ``limits.upload_grace_s``): a client
that stalls mid-body gets 408 instead of holding the connection and its memory. A client
that hangs up mid-body is a client event (``upload_aborted``), not a server error. A string
that names a server-side file is refused: the server reads no local path for a client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, ClientPayloadError, web

from agent.config import LimitsConfig
from agent.transcript_formats import RESPONSE_FORMATS, ResponseFormat
from signaling.errors import ApiError, json_object

#: Largest non-file form field (a prompt, a URL), and most fields in one form.
MAX_FIELD_BYTES = 65_536
MAX_FIELDS = 64
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_PATH_LIKE = re.compile(r"^(/|~|\./|\.\./|file:|[a-zA-Z]:[\\/]|\\\\)")
_LANGUAGE = re.compile(r"^[a-zA-Z]{2,3}$")
_NO_PATHS = "server-side file paths are not accepted: upload the file, or send base64 or a URL"


@dataclass(frozen=True)
class TranscriptionParams:
    """The options of one request (the audio apart)."""

    response_format: ResponseFormat = "json"
    language: str | None = None
    prompt: str | None = None
    model: str | None = None
    stream: bool = False


@dataclass(frozen=True)
class TranscriptionInput:
    """Exactly one of ``data`` (file bytes) and ``url``, plus the options."""

    params: TranscriptionParams
    data: bytes | None = None
    url: str | None = None


class _Pace:
    """The deadline of a body read: ``grace_s + received / min_bytes_per_s`` after its
    start, moved on as bytes arrive. One deadline for the whole body (multipart headers
    included), so a client cannot keep a read alive by trickling a byte now and then."""

    def __init__(self, timeout: asyncio.Timeout, limits: LimitsConfig) -> None:
        self._timeout = timeout
        self._rate = limits.upload_min_bytes_per_s
        self._start = asyncio.get_running_loop().time()
        self._grace = limits.upload_grace_s
        self._received = 0
        timeout.reschedule(self._start + self._grace)

    def got(self, size: int) -> None:
        self._received += size
        self._timeout.reschedule(self._start + self._grace + self._received / self._rate)


@asynccontextmanager
async def _paced(limits: LimitsConfig) -> AsyncIterator[_Pace]:
    try:
        async with asyncio.timeout(None) as timeout:
            yield _Pace(timeout, limits)
    except TimeoutError:
        raise ApiError(
            408,
            "upload_timeout",
            f"the request body arrived slower than {limits.upload_min_bytes_per_s} bytes/s "
            f"after the first {limits.upload_grace_s:g} s (limits.upload_min_bytes_per_s)",
        ) from None
    except (ClientPayloadError, ConnectionError, asyncio.IncompleteReadError):
        # The client hung up mid-body: nobody reads the answer, but the metrics should say
        # it was the client, not a server fault.
        raise ApiError(400, "upload_aborted", "the client ended the upload early") from None


async def read_transcription_request(
    request: web.Request, limits: LimitsConfig
) -> TranscriptionInput:
    """Parse and validate the request; ``ApiError`` (400/408/413/415) on any problem."""
    # Base64 is 4/3 of the file; the other fields get a little room on top.
    cap = limits.max_upload_bytes * 4 // 3 + MAX_FIELD_BYTES
    if request.content_length is not None and request.content_length > cap:
        raise _too_large(limits)
    ctype = request.content_type
    async with _paced(limits) as pace:
        if ctype == "multipart/form-data":
            fields, upload = await _read_multipart(request, limits, pace)
        elif ctype == "application/json":
            fields, upload = _json_fields(await _read_capped(request, cap, limits, pace)), None
        elif ctype == "application/x-www-form-urlencoded":
            raw = await _read_capped(request, MAX_FIELD_BYTES, limits, pace)
            fields, upload = _form_fields(raw), None
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                "send multipart/form-data (a 'file' upload or 'file_url') or application/json "
                f"(base64 'audio' or 'file_url'), not {ctype or 'no content type'}",
            )
    return _build(fields, upload, limits)


async def _read_capped(request: web.Request, cap: int, limits: LimitsConfig, pace: _Pace) -> bytes:
    """The whole body, answering 413 as soon as more than ``cap`` bytes arrived."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(65_536):
        size += len(chunk)
        pace.got(len(chunk))
        if size > cap:
            raise _too_large(limits)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_multipart(
    request: web.Request, limits: LimitsConfig, pace: _Pace
) -> tuple[dict[str, Any], bytes | None]:
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise ApiError(400, "invalid_multipart", f"cannot read the multipart body: {exc}") from None
    fields: dict[str, Any] = {}
    upload: bytes | None = None
    for _ in range(MAX_FIELDS + 1):
        try:
            part = await reader.next()
        except ValueError as exc:
            raise ApiError(400, "invalid_multipart", f"bad multipart body: {exc}") from None
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "invalid_multipart", "nested multipart bodies are not accepted")
        name = part.name or ""
        if name == "file":
            data = await _read_part(part, limits.max_upload_bytes, _too_large(limits), pace)
            if part.filename is None and _is_text(part):
                # A text field, not an upload (``curl -F file=/path``): base64 or a path.
                fields["file"] = data.decode("utf-8", "replace")
            else:
                upload = data
            continue
        too_long = ApiError(400, "invalid_value", f"field {name!r} is over {MAX_FIELD_BYTES} bytes")
        value = (await _read_part(part, MAX_FIELD_BYTES, too_long, pace)).decode("utf-8", "replace")
        if name in ("timestamp_granularities[]", "timestamp_granularities", "include[]"):
            fields.setdefault(name.removesuffix("[]"), []).append(value)
        else:
            fields[name] = value
    else:
        raise ApiError(400, "invalid_multipart", f"more than {MAX_FIELDS} form fields")
    return fields, upload


async def _read_part(part: BodyPartReader, cap: int, overflow: ApiError, pace: _Pace) -> bytes:
    """The part's bytes, raising ``overflow`` as soon as more than ``cap`` arrived."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(65_536):
        size += len(chunk)
        pace.got(len(chunk))
        if size > cap:
            raise overflow
        chunks.append(chunk)
    return b"".join(chunks)


def _is_text(part: BodyPartReader) -> bool:
    ctype = part.headers.get("Content-Type", "text/plain")
    return ctype.split(";")[0].strip().lower() == "text/plain"


def _json_fields(raw: bytes) -> dict[str, Any]:
    body = json_object(raw)
    audio = body.get("audio")
    # mistral-common's TranscriptionRequest nests the audio: {"data": ...} or {"url": ...}.
    if isinstance(audio, dict):
        if isinstance(audio.get("data"), str):
            body["audio"] = audio["data"]
        elif isinstance(audio.get("url"), str):
            body.pop("audio")
            body.setdefault("file_url", audio["url"])
        else:
            raise ApiError(400, "invalid_value", "field 'audio' must hold 'data' (base64) or 'url'")
    audio_url = body.pop("audio_url", None)
    if audio_url is not None:
        url = audio_url.get("url") if isinstance(audio_url, dict) else audio_url
        body.setdefault("file_url", url)
    return body


def _form_fields(raw: bytes) -> dict[str, Any]:
    pairs = urllib.parse.parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
    fields: dict[str, Any] = {}
    for key, value in pairs:
        if key in ("timestamp_granularities[]", "timestamp_granularities"):
            fields.setdefault("timestamp_granularities", []).append(value)
        else:
            fields[key] = value
    return fields


def _build(
    fields: dict[str, Any], upload: bytes | None, limits: LimitsConfig
) -> TranscriptionInput:
    params = TranscriptionParams(
        response_format=_response_format(fields.get("response_format")),
        language=_language(fields.get("language")),
        prompt=_optional_str(fields, "prompt") or None,
        model=_optional_str(fields, "model") or None,
        stream=_bool(fields.get("stream"), "stream"),
    )
    _check_granularities(fields.get("timestamp_granularities"))
    if params.stream and params.response_format not in ("json", "text"):
        raise ApiError(
            400,
            "invalid_value",
            "stream=true sends transcript.text.delta events; use response_format json or text",
        )
    inline = fields.get("audio", fields.get("file"))
    if inline is not None and not isinstance(inline, str):
        raise ApiError(400, "invalid_value", "field 'audio' must be a base64 string")
    url = _optional_str(fields, "file_url") or None
    given = [x for x in (upload, inline, url) if x is not None]
    if not given:
        raise ApiError(
            400,
            "missing_audio",
            "no audio: send a multipart 'file' upload, a 'file_url', or JSON with base64 'audio'",
        )
    if len(given) > 1:
        raise ApiError(400, "invalid_value", "send exactly one of 'file' and 'file_url'")
    if url is not None:
        if _PATH_LIKE.match(url):
            raise ApiError(400, "path_not_allowed", _NO_PATHS)
        return TranscriptionInput(params, url=url)
    data = upload if upload is not None else _decode_base64(inline or "", limits)
    if len(data) > limits.max_upload_bytes:
        raise _too_large(limits)
    return TranscriptionInput(params, data=data)


def _decode_base64(text: str, limits: LimitsConfig) -> bytes:
    text = text.strip()
    if not text:
        raise ApiError(400, "empty_audio", "the audio is empty")
    match = _DATA_URL.match(text)
    if match is None and len(text) < 1024 and _PATH_LIKE.match(text):
        raise ApiError(400, "path_not_allowed", _NO_PATHS)
    payload = text[match.end() :] if match else text
    payload = "".join(payload.split())
    try:
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        if len(text) < 1024 and ("/" in text or "\\" in text):
            raise ApiError(400, "path_not_allowed", _NO_PATHS) from None
        raise ApiError(
            400, "invalid_audio", "the audio is not valid base64 (nor a data: URL)"
        ) from None


def _response_format(value: Any) -> ResponseFormat:
    if value is None or value == "":
        return "json"
    if value not in RESPONSE_FORMATS:
        raise ApiError(
            400,
            "invalid_value",
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}; got {value!r}",
        )
    return value  # type: ignore[no-any-return]


def _language(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _LANGUAGE.match(value):
        raise ApiError(
            400, "invalid_value", f"language must be an ISO 639-1 code like 'en'; got {value!r}"
        )
    return value.lower()


def _check_granularities(value: Any) -> None:
    if value is None:
        return
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item == "word":
            raise ApiError(
                400,
                "unsupported_value",
                "timestamp_granularities 'word' is not supported (the engines give no word "
                "times); use 'segment'",
            )
        if item != "segment":
            raise ApiError(400, "invalid_value", f"timestamp_granularities: unknown value {item!r}")


def _bool(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0", ""):
        return value.lower() in ("true", "1")
    raise ApiError(400, "invalid_value", f"field {name!r} must be true or false")


def _optional_str(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, "invalid_value", f"field {name!r} must be a string")
    return value.strip()


def _too_large(limits: LimitsConfig) -> ApiError:
    return ApiError(
        413,
        "file_too_large",
        f"the audio file is larger than this server accepts ({limits.max_upload_bytes} bytes, "
        "limits.max_upload_bytes)",
    )
