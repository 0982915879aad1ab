"""One HTTP/1.1 connection to a provider: its I/O, flow control and timeouts.

``UpstreamConnection`` is an asyncio protocol that carries one exchange at a time for
``proxy.upstream``'s pool. It writes the request with flow control and feeds the
response to the parser state it inherits from ``proxy.upstream_http.ResponseParser``.
It buffers the body for one reader and pauses reading while that buffer is full, or it
passes the body to a ``BodySink`` from the protocol callbacks. The pool owns the
connection through the ``ConnectionOwner`` callbacks.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Protocol, cast

import httptools

from proxy.upstream_http import (
    MAX_HEAD_BYTES,
    BadResponse,
    ConnectionLost,
    PayloadError,
    ResponseParser,
    StopParsing,
    UpstreamError,
)

__all__ = ["BodySink", "ConnectionOwner", "UpstreamConnection"]

# A request body up to this size goes out with the head in one write. A larger one is
# written in pieces of _WRITE_PIECE_BYTES, each after the transport has drained.
_SINGLE_WRITE_BYTES = 1024 * 1024
_WRITE_PIECE_BYTES = 256 * 1024

# Reading pauses while more body bytes than this wait for the reader, so a reader that
# falls behind (a slow client) keeps about this plus one socket read in memory.
_READ_HIGH_WATER = 256 * 1024


class ConnectionOwner(Protocol):
    """The pool callbacks that a connection calls."""

    def put(self, connection: UpstreamConnection) -> None:
        """Take back a connection whose exchange ended cleanly, for reuse."""

    def forget(self, connection: UpstreamConnection) -> None:
        """Free the slot of a connection that is closing; called once per connection."""

    def closed(self, connection: UpstreamConnection) -> None:
        """Note that the connection's socket is closed."""


class BodySink(Protocol):
    """The receiver of a response body relayed from the protocol callbacks.

    Both methods run inside the connection's ``data_received`` or timer callbacks, so
    they must not raise and must not block.
    """

    def body_received(self, data: bytes) -> None:
        """Take the next body bytes, in order; never called with empty bytes."""

    def body_ended(self, error: UpstreamError | TimeoutError | None) -> None:
        """Note the end of the relay: None when the body is complete, else why it stopped.

        Called once. TimeoutError means no body bytes arrived within the idle timeout;
        an UpstreamError means the body failed or the connection was closed.
        """


class UpstreamConnection(ResponseParser, asyncio.Protocol):
    """One connection to a provider and the state of the exchange in progress on it.

    The parser calls the inherited ``on_*`` methods from ``data_received``. One task at a time
    uses the connection, and it waits on ``_waiter``, which every change of state wakes,
    or hands the rest of the body to a sink with ``relay_body``.
    """

    def __init__(self, owner: ConnectionOwner) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.socket_closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.discarded = False
        """The connection is closed or closing, and no longer counts against the limit."""
        self.exchanges = 0
        """Responses read completely on this connection."""
        self.idle_since = 0.0
        super().__init__()
        self._waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._reading_paused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0
        self._sink: BodySink | None = None
        self._sink_idle_s = 0.0
        self._begin_state("GET", active=False)

    def _begin_state(self, method: str, *, active: bool) -> None:
        self._begin_response(method)
        self.active = active
        self.error: UpstreamError | None = None
        self.received = 0
        self._body_unsent = False

    # The exchange, driven by the one task that uses the connection.

    def begin(self, method: str) -> None:
        """Start an exchange; raise ConnectionLost when the connection closed while idle."""
        reused = self.exchanges > 0
        self._begin_state(method, active=True)
        if self.discarded:
            raise ConnectionLost(
                "provider closed the connection before the request was sent",
                reused=reused,
                response_started=False,
            )

    async def send(self, head: bytes, body: bytes) -> None:
        """Write the request; stop early if the response head arrives or the connection closes."""
        transport = self.transport
        assert transport is not None
        if len(body) <= _SINGLE_WRITE_BYTES:
            transport.write(head + body if body else head)
            return
        transport.write(head)
        view = memoryview(body)
        for offset in range(0, len(body), _WRITE_PIECE_BYTES):
            while self._writing_paused and not (self.discarded or self.head_done):
                await self._wait()
            if self.discarded or self.head_done or transport.is_closing():
                # An early response (such as 413) ends the request; the provider may not
                # expect the rest of the body, so the connection is not reused.
                self._body_unsent = True
                return
            transport.write(view[offset : offset + _WRITE_PIECE_BYTES])

    async def read_head(self) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read_body(self, idle_timeout_s: float | None) -> bytes:
        """Return the body bytes buffered now, waiting for some if there are none."""
        while True:
            if self._chunks:
                return self.take_buffered()
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait(idle_timeout_s)

    def take_buffered(self) -> bytes:
        """Return and clear the buffered body bytes; resume reading if it was paused."""
        data = self._take_chunks()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def relay_body(self, sink: BodySink, idle_timeout_s: float) -> None:
        """Pass the rest of the body to ``sink`` from the protocol callbacks, until it ends.

        Bytes buffered now go to the sink before this returns. Then the body bytes parsed
        from each socket read go to ``sink.body_received``, and ``sink.body_ended`` is called
        once: when the body is complete, when it fails, when the connection is closed
        (``abort`` included), or when no body bytes arrive within ``idle_timeout_s``
        while reading is not paused. Reading is never paused by the buffer in this mode:
        the sink pauses it with ``pause_reading``.
        """
        self._sink = sink
        self._sink_idle_s = idle_timeout_s
        if self._chunks:
            sink.body_received(self.take_buffered())
        if self.complete:
            self._end_sink(None)
            return
        if self.error is not None or self.discarded:
            # A no-op when the sink closed the connection and has ended already.
            self._end_sink(self.error or _closed_early())
            return
        self._idle_deadline = time.monotonic() + idle_timeout_s
        if self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(
                idle_timeout_s, self._idle_timer_fired
            )

    def pause_reading(self) -> None:
        """Stop reading from the provider until ``resume_reading`` (a slow client)."""
        transport = self.transport
        if not self._reading_paused and transport is not None and not transport.is_closing():
            self._reading_paused = True
            transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again; the idle timeout of a relay starts over from now."""
        self._idle_deadline = time.monotonic() + self._sink_idle_s
        transport = self.transport
        if self._reading_paused and transport is not None and not transport.is_closing():
            self._reading_paused = False
            transport.resume_reading()

    def _pass_to_sink(self) -> None:
        # One piece per socket read, not per chunk of the provider's chunked coding, so a
        # read that contains many chunks becomes one client write.
        assert self._sink is not None
        if self._chunks:
            self._idle_deadline = time.monotonic() + self._sink_idle_s
            self._sink.body_received(self._take_chunks())
        if self.complete:
            self._end_sink(None)

    def _end_sink(self, error: UpstreamError | TimeoutError | None) -> None:
        """Pass the body bytes parsed so far to the sink, then end it; a no-op once ended."""
        sink, self._sink = self._sink, None
        if sink is None:
            return
        self._cancel_idle_timer()
        if self._chunks:
            sink.body_received(self._take_chunks())
        sink.body_ended(error)

    def _take_chunks(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self.buffered = 0
        return data

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not (self.discarded or self._body_unsent)

    def finish(self) -> None:
        """End the exchange: back to the pool when reusable, else closed."""
        if not self.active:
            return
        self.active = False
        self._cancel_idle_timer()
        if self.reusable:
            self.exchanges += 1
            self._chunks = []
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            self.owner.put(self)
        else:
            self.abort()

    def close(self) -> None:
        """Close the connection after its buffered writes (idle connections, shutdown)."""
        self.active = False
        if self.transport is not None:
            self.transport.close()
        self._discard()

    def abort(self) -> None:
        """Close the connection at once, discarding buffered writes."""
        self.active = False
        self._cancel_idle_timer()
        if self.transport is not None:
            self.transport.abort()
        self._discard()
        if self._sink is not None:
            self._end_sink(None if self.complete else (self.error or _closed_early()))

    def _discard(self) -> None:
        if not self.discarded:
            self.discarded = True
            self.owner.forget(self)

    async def _wait(self, timeout_s: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        if timeout_s is not None:
            # One timer serves many waits: when it fires before the current deadline it
            # moves there, which saves scheduling and cancelling a timer per stream read.
            # time.monotonic() rather than loop.time(): uvloop's loop time is cached per
            # loop iteration in whole milliseconds, so a deadline derived from it can
            # pass a fraction of a millisecond before the timeout has.
            self._idle_deadline = time.monotonic() + timeout_s
            if self._idle_timer is None:
                self._idle_timer = loop.call_later(timeout_s, self._idle_timer_fired)
        try:
            await waiter
        finally:
            self._waiter = None

    def _idle_timer_fired(self) -> None:
        self._idle_timer = None
        if self._sink is not None:
            self._relay_idle_timer_fired()
            return
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        remaining = self._idle_deadline - time.monotonic()
        if remaining <= 0:
            waiter.set_exception(TimeoutError())
        else:
            self._idle_timer = asyncio.get_running_loop().call_later(
                remaining, self._idle_timer_fired
            )

    def _relay_idle_timer_fired(self) -> None:
        now = time.monotonic()
        if self._reading_paused:
            # The client is slow, not the provider: resume_reading starts the timeout over.
            remaining = self._sink_idle_s
        else:
            remaining = self._idle_deadline - now
        if remaining <= 0:
            self._end_sink(TimeoutError())
        else:
            self._idle_timer = asyncio.get_running_loop().call_later(
                remaining, self._idle_timer_fired
            )

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.active or self.complete:
            # Unrequested bytes: the connection's state is unknown from here on.
            self.keep_alive = False
            self.abort()
            return
        self.received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, StopParsing):
                self.keep_alive = False
                self.abort()
            else:
                self._fail(cause if isinstance(cause, UpstreamError) else self._parse_error(exc))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(self._parse_error(exc))
        else:
            if self._sink is not None:
                self._pass_to_sink()
            elif not self.head_done and self.received > MAX_HEAD_BYTES:
                self._fail(BadResponse(f"response head over {MAX_HEAD_BYTES} bytes"))
            elif self.buffered > _READ_HIGH_WATER and not self._reading_paused:
                self._reading_paused = True
                assert self.transport is not None
                self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        # The transport closes itself; connection_lost decides what the end means.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.socket_closed.set_result(None)
        self.owner.closed(self)
        if not self.complete and self.error is None:
            if not self.head_done:
                self.error = ConnectionLost(
                    "provider closed the connection before answering"
                    if exc is None
                    else f"provider reset the connection before answering: {exc}",
                    reused=self.exchanges > 0,
                    response_started=self.received > 0,
                )
            elif exc is None and not self._framed:
                # A body without Content-Length or chunked framing ends with the
                # connection (RFC 9112 §6.3).
                self.complete = True
            else:
                self.error = PayloadError(
                    "the provider closed the connection before the response was complete"
                )
        self._cancel_idle_timer()
        self._discard()
        if self._sink is not None:
            self._end_sink(None if self.complete else self.error)
        self._wake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.abort()


def _closed_early() -> PayloadError:
    return PayloadError("the connection was closed before the response was complete")
