"""uvicorn's HTTP/1.1 protocol with a deadline for each request head.

uvicorn has no timeout for receiving a request. Its ``timeout_keep_alive`` runs only between
requests, is cancelled by the first byte of the next one and is never armed on a new
connection, so a client that opens a connection and sends nothing, or sends a request line and
never finishes its headers (slowloris), holds that connection and its file descriptor forever,
without any key. ``HeadDeadlineProtocol`` adds the missing deadline:

- armed when a connection opens, and on a kept-alive connection when the first byte of the
  next request arrives (before that, uvicorn's keep-alive timer closes an idle connection);
- never extended by further bytes: the whole head (request line and headers) must arrive
  within ``head_timeout`` seconds;
- disarmed once the head is complete (the body is the route's business: a route reads it
  only after the key was checked);
- on expiry the connection is closed.

One more rule closes the same hole for bodies: when a response is complete but the request's
body has not fully arrived (the app answered without needing it, say a 401 before any key was
checked), the connection is closed instead of waiting for, and throwing away, the rest of the
body at the client's pace (uvicorn would keep reading it, forever for an endless chunked body).

Why a subclass and not another server: the candidates with a header read timeout as a
setting do not fit how ``twinkle-server serve`` runs. Granian serves an app by import path
from worker processes of its own, while twinkle-server loads the model into its own process,
builds the app around it and serves a socket it bound before loading. Hypercorn's
``read_timeout`` bounds each read separately, so a client trickling one byte at a time is
never cut off. Swapping the server under every route for one timer would also change far
more than this one behaviour; the subclass touches nothing but the timer.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadDeadlineProtocol(H11Protocol):
    """``H11Protocol`` that closes a connection whose request head is not complete in time
    (use ``head_deadline_protocol``, which sets ``head_timeout``)."""

    head_timeout: float
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            # Still waiting for (the rest of) a head: the deadline runs from its first byte, or
            # from the connection's start; more bytes never push it back.
            if self._head_deadline is None and not self.transport.is_closing():
                self._arm_head_deadline()
        else:
            self._disarm_head_deadline()  # the head is complete: a request is in progress

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.transport.close()  # after what was written: the response still goes out
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_deadline_expired)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_deadline_expired(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.transport.close()


def head_deadline_protocol(head_timeout: float) -> type[HeadDeadlineProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``, with this deadline in seconds."""
    if not head_timeout > 0:
        raise ValueError(f"head_timeout must be > 0, got {head_timeout}")
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout": float(head_timeout)})
