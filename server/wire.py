"""Request and response bodies of the object routes: msgpack by default, JSON on request.

A request whose ``Content-Type`` is ``application/json`` is read as JSON and answered in
JSON; everything else is msgpack (``twinkle_client.codec``). In JSON answers the codec's
packed arrays become plain nested lists, since JSON has no bytes.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from twinkle.errors import InvalidArgumentError, PayloadTooLargeError, UnsupportedMediaTypeError
from twinkle.protocol import codec
from twinkle.protocol.limits import MAX_BODY_BYTES

JSON = "application/json"
MSGPACK = codec.CONTENT_TYPE
_MSGPACK_TYPES = {MSGPACK, "application/x-msgpack", "application/vnd.msgpack"}


def _too_large(what: str) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"request body {what} more than {MAX_BODY_BYTES >> 20} MiB, the most this server accepts; "
        "send the data in smaller requests"
    )


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def is_json_request(request: Request) -> bool:
    return _media_type(request.headers.get("content-type")) == JSON


def wants_msgpack(request: Request) -> bool:
    """Answer in msgpack: the request body was msgpack, or a body-less request asked for it."""
    content_type = _media_type(request.headers.get("content-type"))
    if content_type:
        return content_type in _MSGPACK_TYPES
    accept = [_media_type(part) for part in request.headers.get("accept", "").split(",")]
    return bool(accept) and accept[0] in _MSGPACK_TYPES


async def read_body(request: Request) -> Any:
    """The decoded body; a malformed one is an ``InvalidArgumentError`` (400)."""
    content_type = _media_type(request.headers.get("content-type"))
    body = _inflate(await _read_capped(request), request.headers.get("content-encoding"))
    if content_type == JSON:
        try:
            return json.loads(body)
        except ValueError as exc:
            raise InvalidArgumentError(f"request body is not valid JSON: {exc}") from None
    if content_type and content_type not in _MSGPACK_TYPES:
        raise InvalidArgumentError(f"Content-Type must be {MSGPACK} or {JSON}, got {content_type}")
    if not body:
        raise InvalidArgumentError("request body is empty")
    return codec.unpack(body)


async def _read_capped(request: Request) -> bytes:
    """The raw body, refused (413) as soon as it is known to exceed ``MAX_BODY_BYTES``."""
    limit = MAX_BODY_BYTES
    declared = request.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise _too_large("is")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large("is")
        chunks.append(chunk)
    return b"".join(chunks)


def _inflate(body: bytes, encoding: str | None) -> bytes:
    """Undo ``Content-Encoding: gzip`` (the client compresses large batches)."""
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise UnsupportedMediaTypeError(f"Content-Encoding {encoding} is not supported; send gzip or none")
    limit = MAX_BODY_BYTES
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
        if inflater.unconsumed_tail or len(data) > limit:
            raise _too_large("inflates to")
        data += inflater.flush()
        if len(data) > limit:
            raise _too_large("inflates to")
    except zlib.error as exc:
        raise InvalidArgumentError(f"request body is not valid gzip: {exc}") from None
    if not inflater.eof:
        raise InvalidArgumentError("request body is not valid gzip: it ends early")
    return data


def jsonable(data: Any) -> Any:
    """Wire data made JSON-safe: packed arrays become nested lists, other bytes base64 text."""
    if isinstance(data, dict):
        if "__nd__" in data and "data" in data:
            arr = np.frombuffer(data["data"], dtype=np.dtype(data["__nd__"])).reshape(data["shape"])
            return arr.tolist()
        return {k: jsonable(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [jsonable(v) for v in data]
    if isinstance(data, bytes):
        return base64.b64encode(data).decode()
    if isinstance(data, float) and not np.isfinite(data):
        return None
    return data


def respond(request: Request, payload: BaseModel | dict[str, Any], status_code: int = 200,
            headers: dict[str, str] | None = None) -> Response:
    """``payload`` in the request's format."""
    data = payload.model_dump(mode="python") if isinstance(payload, BaseModel) else payload
    if wants_msgpack(request):
        return Response(codec.pack(data), status_code=status_code, media_type=MSGPACK, headers=headers)
    return JSONResponse(jsonable(data), status_code=status_code, headers=headers)
