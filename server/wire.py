"""Request and response bodies of the object routes: msgpack by default, JSON on request.

A request whose ``Content-Type`` is ``application/json`` is read as JSON and answered in
JSON; everything else is msgpack (``twinkle.protocol.codec``). In JSON answers the codec's
packed arrays become plain nested lists, since JSON has no bytes.

What one request may cost is bounded before it is spent: the body is read up to
``MAX_BODY_BYTES`` (also after gzip is undone), and the decoded value up to the codec's
``Bounds`` (values, nesting, packed array elements), refused while it is being built. Only
reading the bytes happens on the event loop; inflating, parsing, checking and validating run
on the decoding threads (``DECODE_THREADS`` of them), so that a hostile body never holds up
other users' requests, health included.
"""

from __future__ import annotations

import asyncio
import base64
import json
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from twinkle.errors import InvalidArgumentError, PayloadTooLargeError, UnsupportedMediaTypeError, first_line
from twinkle.protocol import codec
from twinkle.protocol.limits import MAX_BODY_BYTES

T = TypeVar("T")
JSON = "application/json"
MSGPACK = codec.CONTENT_TYPE
_MSGPACK_TYPES = {MSGPACK, "application/x-msgpack", "application/vnd.msgpack"}


def _too_large(what: str, limit: int | None = None) -> PayloadTooLargeError:
    most = f"{MAX_BODY_BYTES >> 20} MiB" if limit is None else f"{limit >> 10} KiB"
    return PayloadTooLargeError(
        f"request body {what} more than {most}, the most this server accepts"
        f"{'' if limit is None else ' here'}; send the data in smaller requests"
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


DECODE_THREADS = 2
"""Request bodies decoded at once. Few: decoding is CPU work under the GIL, and each body being
decoded holds its memory (see the README's server section for one request's bound)."""
REQUEST_BOUNDS = codec.Bounds()
_decoder: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    global _decoder
    if _decoder is None:
        _decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="twinkle-decode")
    return _decoder


async def read_body(request: Request, then: Callable[[Any], T] | None = None, *, limit: int | None = None) -> Any:
    """The decoded body, or ``then(decoded body)``: everything after the bytes arrived (inflating,
    parsing, the bounds, ``then``'s validation) runs on a decoding thread, not the event loop.
    A malformed body is an ``InvalidArgumentError`` (400), one too large a ``PayloadTooLargeError``
    (413); ``limit`` is a route's own bound on the body (bytes, before and after gzip; default
    ``MAX_BODY_BYTES``)."""
    content_type = _media_type(request.headers.get("content-type"))
    if content_type and content_type != JSON and content_type not in _MSGPACK_TYPES:
        raise InvalidArgumentError(f"Content-Type must be {MSGPACK} or {JSON}, got {content_type[:100]}")
    held = [await _read_capped(request, limit)]
    encoding = request.headers.get("content-encoding")

    def decode() -> Any:
        body = _inflate(held.pop(), encoding, limit)  # the compressed bytes are let go here...
        data = decode_body(body, is_json=content_type == JSON)
        del body  # ... and the body's once it is decoded
        return then(data) if then is not None else data

    return await asyncio.wrap_future(_decode_pool().submit(decode))


def decode_body(body: bytes | bytearray, *, is_json: bool, bounds: codec.Bounds = REQUEST_BOUNDS) -> Any:
    """Parse a request body within ``bounds`` (CPU-bound: call it off the event loop)."""
    if not is_json:
        if not body:
            raise InvalidArgumentError("request body is empty")
        return codec.unpack_request(body, bounds)
    # json.loads cannot stop midway, so bound what it builds first: a JSON text holds at most one
    # list item or map entry per comma, '[' and '{', plus one (strings holding those characters
    # only make this stricter); check_wire then counts exactly.
    most = body.count(b",") + body.count(b"[") + body.count(b"{") + 1
    if most > bounds.values:
        raise PayloadTooLargeError(
            f"JSON request body may hold more than {bounds.values} values (counting commas and brackets); "
            "send the data in smaller requests, or as msgpack"
        )
    try:
        data = json.loads(body)
    except RecursionError:
        raise InvalidArgumentError(f"request body nests lists and maps more than {bounds.depth} deep") from None
    except ValueError as exc:  # also the UnicodeDecodeError of a body that is not UTF-8
        raise InvalidArgumentError(f"request body is not valid JSON: {first_line(exc)}") from None
    codec.check_wire(data, bounds)
    return data


async def _read_capped(request: Request, limit: int | None = None) -> bytearray:
    """The raw body, refused (413) as soon as it is known to exceed ``limit`` (None:
    ``MAX_BODY_BYTES``). One growing buffer, so that the body is never held twice (as chunks
    and joined)."""
    most = MAX_BODY_BYTES if limit is None else limit
    declared = request.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > most:
        raise _too_large("is", limit)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > most:
            raise _too_large("is", limit)
        body += chunk
    return body


def _inflate(body: bytes | bytearray, encoding: str | None, limit: int | None = None) -> bytes | bytearray:
    """Undo ``Content-Encoding: gzip`` (the client compresses large batches), up to ``limit``
    bytes (None: ``MAX_BODY_BYTES``)."""
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise UnsupportedMediaTypeError(f"Content-Encoding {encoding} is not supported; send gzip or none")
    most = MAX_BODY_BYTES if limit is None else limit
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, most + 1)
        if inflater.unconsumed_tail or len(data) > most:
            raise _too_large("inflates to", limit)
        data += inflater.flush()
        if len(data) > most:
            raise _too_large("inflates to", limit)
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


async def respond_off_loop(request: Request, payload: BaseModel | dict[str, Any]) -> Response:
    """``respond``, encoded on a decoding thread: call results can be large (a JSON answer turns
    every packed array into nested lists), and encoding them must not hold up the event loop."""
    return await asyncio.wrap_future(_decode_pool().submit(respond, request, payload))
