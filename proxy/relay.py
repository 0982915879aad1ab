"""Relaying a streamed response body to the client from the upstream protocol callbacks.

Once the client's status line and the held first bytes are out through aiohttp,
``StreamRelay`` takes the rest of the body. The upstream connection passes the body
bytes of each socket read to ``body_received``. It frames them as one chunk of the
chunked coding (RFC 9112 §7.1), byte for byte as aiohttp's StreamWriter frames a write,
and writes the chunk to the client's transport within the same callback. No task wakes
per read: the relay task sleeps in ``wait`` until the body ends or the client's
transport pauses writing, and in the second case drains the client and calls
``resume``.

A response that aiohttp does not frame with chunked coding (an HTTP/1.0 client, a
provider's Content-Length) is relayed read by read by the task instead, and
``record`` keeps the same count and tail for it.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter

from proxy.upstream import UpstreamError, UpstreamResponse

__all__ = ["StreamRelay", "chunked_client_transport"]


def chunked_client_transport(
    response: web.StreamResponse, writer: AbstractStreamWriter
) -> tuple[asyncio.Transport, BaseProtocol] | None:
    """Return the client's transport and protocol when body chunks may be written to it.

    That is when aiohttp frames the prepared ``response`` with chunked coding and no
    compression; otherwise (HTTP/1.0 client, Content-Length) None. The caller must have
    written a non-empty body part through aiohttp, which sends the buffered head.

    Relies on aiohttp internals, checked against aiohttp 3.14.5: the writer returned by
    ``StreamResponse.prepare`` is an ``aiohttp.http_writer.StreamWriter`` whose
    ``chunked`` flag is set by ``prepare`` for chunked framing, and whose ``protocol``
    is the server protocol that tracks the transport's writing pause.
    """
    if not isinstance(writer, StreamWriter) or not writer.chunked or response.compression:
        return None
    transport = writer.transport
    if transport is None or transport.is_closing():
        return None
    return transport, writer.protocol


class StreamRelay:
    """The body bytes relayed after the held first bytes: their count, tail and end.

    With ``start``, it is the ``BodySink`` of the upstream connection and writes to the
    client itself. It closes the upstream response when the client is gone, and ends
    with a ConnectionResetError then.
    """

    __slots__ = (
        "_protocol",
        "_tail",
        "_transport",
        "_upstream",
        "_waiter",
        "bytes_out",
        "ended",
        "error",
        "paused",
    )

    def __init__(self, upstream: UpstreamResponse, tail: bytes) -> None:
        self._upstream = upstream
        self._tail = tail
        """The last chunk of 4 bytes or more, or the last 4 bytes relayed."""
        self._transport: asyncio.Transport | None = None
        self._protocol: BaseProtocol | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.bytes_out = 0
        self.ended = False
        self.error: UpstreamError | TimeoutError | ConnectionResetError | None = None
        """Why the relay ended early: None after a complete body."""
        self.paused = False
        """Upstream reading is paused until the client's transport drains."""

    @property
    def tail(self) -> bytes:
        """The last 4 bytes relayed, for the SSE event boundary check."""
        return self._tail[-4:]

    def record(self, chunk: bytes) -> None:
        """Count a chunk written to the client by the relay task."""
        self.bytes_out += len(chunk)
        self._tail = chunk if len(chunk) >= 4 else (self._tail + chunk)[-4:]

    def start(
        self, transport: asyncio.Transport, protocol: BaseProtocol, idle_timeout_s: float
    ) -> None:
        """Relay the rest of the body from the upstream callbacks until ``ended``."""
        self._transport = transport
        self._protocol = protocol
        self._upstream.relay(self, idle_timeout_s)

    async def wait(self) -> None:
        """Return once the relay has ended or is paused for a slow client."""
        if self.ended or self.paused:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def resume(self) -> None:
        """Read from the provider again, once the client's transport has drained."""
        self.paused = False
        transport = self._transport
        if transport is not None and transport.is_closing():
            self._client_gone()
        else:
            self._upstream.resume_reading()

    # BodySink, called from the upstream connection's protocol callbacks.

    def body_received(self, data: bytes) -> None:
        transport = self._transport
        protocol = self._protocol
        assert transport is not None
        assert protocol is not None
        if self.ended:
            return
        if transport.is_closing():
            self._client_gone()
            return
        # The framing of StreamWriter._write_chunked_payload in aiohttp 3.14.5.
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        self.record(data)
        if protocol.writing_paused and not self.paused:
            # The client reads slower than the provider writes: stop reading until the
            # client's transport drains, so at most about its high-water mark plus one
            # upstream read waits in memory.
            self.paused = True
            self._upstream.pause_reading()
            self._wake()

    def body_ended(self, error: UpstreamError | TimeoutError | None) -> None:
        self._end(error)

    def _client_gone(self) -> None:
        self._end(ConnectionResetError("the client closed the connection"))
        # Closing the upstream connection makes the provider stop generating. Its
        # body_ended call comes after the end above and is ignored.
        self._upstream.close()

    def _end(self, error: UpstreamError | TimeoutError | ConnectionResetError | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
