"""Relaying a streamed response to the client, after its status line has been decided.

``RelayedStreams.relay`` sends the status line and the held first bytes through
aiohttp, relays the rest of the body, and ends the stream. From the status line on, a
failure can only be reported inside the stream: an SSE stream ends with one error event
(``sse.error_frame``) and without ``data: [DONE]``, and a large non-SSE body is cut off.
Upstream errors of this phase (``proxy.upstream`` exceptions and the idle timeout) are
translated into these stream outcomes here and nowhere else. ``proxy.forward``
translates the ones that come before the status line.

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
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter

from proxy import sse
from proxy.headers import filter_response_headers
from proxy.upstream import UpstreamError, UpstreamResponse

if TYPE_CHECKING:
    # Imported for type checking only, because proxy.forward imports this module.
    from proxy.forward import Exchange

__all__ = ["RelayedStreams", "StreamRelay", "chunked_client_transport"]

logger = logging.getLogger(__name__)


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


class RelayedStreams:
    """The streams being relayed to clients, each in its own task, and their shutdown.

    Once the client's status line is out, a failure can only be reported inside the
    stream: an SSE stream ends with one error event (``sse.error_frame``) and without
    ``data: [DONE]``.
    """

    def __init__(self, idle_timeout_s: float) -> None:
        self._streams: dict[asyncio.Task[Any], Exchange] = {}
        self._aborting: set[asyncio.Task[Any]] = set()
        self._idle_timeout_s = idle_timeout_s

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def abort(self) -> int:
        """End every stream in flight with the ``shutting_down`` event; return how many."""
        for task in self._streams:
            self._aborting.add(task)
            task.cancel("gateway shutdown deadline")
        return len(self._streams)

    async def relay(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        held_bytes: bytes,
        exchange: Exchange,
        *,
        event_stream: bool,
    ) -> web.StreamResponse:
        """Relay a stream as it arrives; failures end an SSE stream with one error event.

        ``held_bytes`` is the start of the body, read while the client's status was decided,
        and ``event_stream`` is False for a large non-SSE body. Such a body that fails is
        cut off without its last chunk, so the client sees an incomplete response rather
        than a complete-looking one.
        """
        headers = filter_response_headers(upstream.headers)
        if event_stream:
            headers["Cache-Control"] = "no-cache"
            headers["X-Accel-Buffering"] = "no"
        response = web.StreamResponse(status=upstream.status, headers=headers)
        relay = StreamRelay(upstream, held_bytes[-4:])
        failure: str | None = None
        task = asyncio.current_task()
        assert task is not None
        self._streams[task] = exchange

        try:
            # Send the status line and the held first bytes through aiohttp.
            writer = await response.prepare(request)
            assert writer is not None
            await response.write(held_bytes)
            exchange.ttft_ms = (time.monotonic() - exchange.started) * 1000
            exchange.bytes_out += len(held_bytes)

            # Relay the rest from the upstream callbacks when the client's response is
            # chunked, else read by read.
            client = chunked_client_transport(response, writer) if held_bytes else None
            if client is not None:
                error = await self._relay_from_callbacks(relay, writer, *client)
            else:
                error = await self._relay_reads(upstream, relay, response)

            # Finish: a clean end, or the failure that stopped the relay.
            if isinstance(error, ConnectionResetError):
                raise error
            if isinstance(error, TimeoutError):
                failure = "upstream_idle_timeout"
            elif error is not None:
                logger.warning(
                    "provider %s broke the stream of request %s: %s",
                    upstream.origin,
                    exchange.request_id,
                    error,
                )
                failure = "upstream_reset"
            elif event_stream and not sse.ends_at_event_boundary(relay.tail):
                failure = "upstream_incomplete"

            if failure is not None and not event_stream:
                upstream.close()
                exchange.outcome = exchange.stream_failure = failure
                request.protocol.force_close()
            elif failure is not None:
                upstream.close()
                await self._end_with_error(response, failure, relay.tail, exchange)
            else:
                await response.write_eof()
        except asyncio.CancelledError:
            upstream.close()
            if task not in self._aborting:
                self._client_gone(exchange)
                raise
            # abort_streams() cancelled this stream at the shutdown deadline: end it with
            # the error event instead of dropping the connection.
            task.uncancel()
            await self._end_with_error(response, "shutting_down", relay.tail, exchange)
        except ConnectionResetError:
            upstream.close()
            self._client_gone(exchange)
        finally:
            exchange.bytes_out += relay.bytes_out
            upstream.release()
            self._streams.pop(task, None)
            self._aborting.discard(task)
        return response

    async def _relay_from_callbacks(
        self,
        relay: StreamRelay,
        writer: AbstractStreamWriter,
        transport: asyncio.Transport,
        protocol: BaseProtocol,
    ) -> UpstreamError | TimeoutError | ConnectionResetError | None:
        """Let the upstream connection write the body to the client; return why it ended."""
        relay.start(transport, protocol, self._idle_timeout_s)
        while True:
            await relay.wait()
            if relay.ended:
                return relay.error
            # Paused for a slow client: wait until its transport drains, then read on.
            # aiohttp's drain raises a plain ConnectionError when the connection was
            # lost with an error while paused.
            try:
                await writer.drain()
            except ConnectionError as exc:
                return ConnectionResetError(str(exc))
            relay.resume()

    async def _relay_reads(
        self, upstream: UpstreamResponse, relay: StreamRelay, response: web.StreamResponse
    ) -> UpstreamError | TimeoutError | None:
        """Relay the body read by read through aiohttp; return the error that ended it."""
        while True:
            try:
                chunk = await upstream.readany(self._idle_timeout_s)
            except (TimeoutError, UpstreamError) as exc:
                return exc
            if not chunk:
                return None
            await response.write(chunk)
            relay.record(chunk)

    def _client_gone(self, exchange: Exchange) -> None:
        # Closing the upstream connection (done by the caller) makes the provider stop
        # generating; a disconnect is the client's choice, not an error.
        exchange.outcome = "client_disconnect"
        logger.info("client disconnected from request %s", exchange.request_id)

    async def _end_with_error(
        self, response: web.StreamResponse, failure: str, tail: bytes, exchange: Exchange
    ) -> None:
        exchange.outcome = failure
        exchange.stream_failure = failure
        try:
            async with asyncio.timeout(1.0):
                await response.write(_failure_frame(failure, tail))
                await response.write_eof()
        except (ConnectionResetError, TimeoutError):
            logger.info("could not send the %s event of request %s", failure, exchange.request_id)


_FAILURE_MESSAGES = {
    "upstream_reset": "The provider closed the connection before the response was complete.",
    "upstream_idle_timeout": "The provider sent nothing within the idle timeout.",
    "upstream_incomplete": "The provider ended the stream in the middle of an event.",
    "shutting_down": "The gateway is shutting down and could not wait for this stream to finish.",
}


def _failure_frame(failure: str, tail: bytes) -> bytes:
    # A blank line first when the provider stopped inside an event, so that the error
    # is parsed as an event of its own rather than glued to the partial one.
    prefix = b"" if sse.ends_at_event_boundary(tail) else b"\n\n"
    return prefix + sse.error_frame(_FAILURE_MESSAGES[failure], failure)
