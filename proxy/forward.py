"""Sending a client request to a provider, with retries, and relaying its response.

One attempt has two phases. Before any byte reaches the client, a connection failure
or an upstream 500/502/504 may be retried (at most ``MAX_ATTEMPTS`` attempts), but a
timeout gets its 504 at once and is never retried. Once the client's status line is out,
failures can only be reported inside the stream, as one error event
(``sse.error_frame``), and the stream ends without ``data: [DONE]``.

Foreign errors (``proxy.upstream`` client exceptions, asyncio timeouts) are translated
here and nowhere else into ``proxy.errors`` classes or stream outcomes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict

from proxy import sse
from proxy.completions import completion_id_from_body, completion_id_from_event
from proxy.errors import ProviderUnavailable, UpstreamTimeout
from proxy.headers import filter_response_headers
from proxy.metrics import Metrics
from proxy.relay import StreamRelay, chunked_client_transport
from proxy.routing import Balancer, Target
from proxy.upstream import (
    BadResponse,
    ConnectionLost,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

__all__ = ["MAX_ATTEMPTS", "Exchange", "Forwarder"]

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Attempts per request, the first one included."""

_PROVIDER_FAILURE_STATUSES = frozenset({500, 502, 504})
_UPSTREAM_AUTH_STATUSES = frozenset({401, 403})

# A non-streaming response up to this size is read whole and sent with Content-Length;
# a larger one is relayed as it arrives, so memory per request stays bounded.
HELD_BODY_LIMIT = 8 * 1024 * 1024

# Bytes held while waiting for the first complete event. A first event larger than
# this is relayed without inspection rather than buffered without bound.
FIRST_EVENT_HOLD_LIMIT = 1024 * 1024


@dataclass(slots=True)
class Exchange:
    """The record of one client request, for the access log and metrics."""

    request_id: str
    started: float = field(default_factory=time.monotonic)
    route: str = ""
    model: str | None = None
    provider: str | None = None
    pinned: bool = False
    outcome: str = "ok"
    attempts: int = 0
    ttft_ms: float | None = None
    bytes_out: int = 0
    stream_failure: str | None = None
    """The code of the error event that ended the stream, if one did."""


class _ProviderFailure(Exception):
    """An attempt failed before any byte reached the client; another may follow."""

    def __init__(
        self,
        reason: str,
        *,
        kind: str,
        counts_as_failure: bool = True,
        closed_before_response: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        """Bounded metrics label: connect_error, bad_response, upstream_status, error_event,
        incomplete."""
        self.counts_as_failure = counts_as_failure
        self.closed_before_response = closed_before_response
        """A reused pooled connection closed before any response byte: it may have been
        closed by the provider as idle while the request was on its way."""


@dataclass(slots=True)
class _Held:
    """An upstream response whose status line has not been sent to the client yet."""

    upstream: UpstreamResponse
    streaming: bool
    buffered: bytes = b""
    event_stream: bool = True
    """With ``streaming``: an SSE stream (False: a large body relayed as it arrives)."""
    first_event: bytes = b""
    """The first SSE event block, read from a copy of the buffered bytes."""


class Forwarder:
    """Forwards requests over one shared UpstreamPool and picks endpoints with a Balancer."""

    def __init__(
        self,
        pool: UpstreamPool,
        balancer: Balancer,
        *,
        first_byte_timeout_s: float,
        idle_timeout_s: float,
        request_timeout_s: float,
        retry_backoff_s: float,
        metrics: Metrics,
        on_completion: Callable[[str, Target, str], None] | None = None,
    ) -> None:
        self._pool = pool
        self._balancer = balancer
        self._metrics = metrics
        self._on_completion = on_completion
        self._streams: dict[asyncio.Task[Any], Exchange] = {}
        self._aborting: set[asyncio.Task[Any]] = set()
        self._first_byte_timeout_s = first_byte_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._request_timeout_s = request_timeout_s
        self._retry_backoff_s = retry_backoff_s

    async def forward(
        self,
        request: web.Request,
        *,
        body: bytes,
        headers: CIMultiDict[str],
        targets: Sequence[Target],
        pinned: bool,
        stream: bool,
        exchange: Exchange,
        completion: bool = False,
    ) -> web.StreamResponse:
        """Send the request to one of ``targets`` and return the client's response.

        With ``completion``, the id of a successful response is passed to the
        ``on_completion`` callback before the response is relayed, so that signature
        fetches find its provider. Raises ProviderUnavailable after the last failed
        attempt and UpstreamTimeout when the first-byte (streams) or total (other
        requests) timeout expires.
        """
        tried: list[Target] = []
        replaced_stale_connection = False
        fresh_connection = False
        while True:
            # Choose an endpoint: untried ones first, and for unpinned requests the
            # ones not ejected after recent failures.
            target = self._balancer.choose(targets, tried=tried)
            tried.append(target)
            exchange.attempts += 1
            exchange.provider = target.url

            # An unpinned stream whose first event is an error goes to another
            # endpoint while there is one left to try.
            retry_error_event = (
                not pinned and exchange.attempts < MAX_ATTEMPTS and len(tried) < len(targets)
            )
            self._balancer.started(target)
            fresh, fresh_connection = fresh_connection, False
            try:
                try:
                    held = await self._attempt(
                        request, target, body, headers, stream, retry_error_event, fresh=fresh
                    )
                except UpstreamTimeout:
                    self._metrics.upstream_attempts.labels("timeout").inc()
                    raise
                self._metrics.upstream_attempts.labels("ok").inc()
                if completion and self._on_completion is not None:
                    chat_id = _completion_id(held)
                    if chat_id is not None:
                        self._on_completion(chat_id, target, exchange.model or "")
                if held.streaming:
                    return await self._relay_stream(request, held, exchange)
                return await self._relay_body(held, exchange)
            except _UpstreamErrorEvent as event:
                exchange.outcome = "upstream_error_event"
                return web.Response(
                    status=event.status, body=event.body, content_type="application/json"
                )
            except _ProviderFailure as failure:
                self._metrics.upstream_attempts.labels(failure.kind).inc()
                if failure.closed_before_response and not replaced_stale_connection:
                    # Providers close idle keep-alive connections (uvicorn after 5 s), so
                    # a pooled connection can be closed while the request is on its way.
                    # One immediate retry on a new connection is not an attempt. Only a
                    # reused connection gets it: a provider that closes new connections
                    # at once gets no free retry.
                    replaced_stale_connection = True
                    fresh_connection = True
                    self._metrics.upstream_retries.labels("stale_connection").inc()
                    exchange.attempts -= 1
                    tried.pop()
                    continue
                if failure.counts_as_failure:
                    self._balancer.failed(target)
                if exchange.attempts >= MAX_ATTEMPTS:
                    logger.warning(
                        "giving up on request %s after %d attempts: %s from %s",
                        exchange.request_id,
                        exchange.attempts,
                        failure.reason,
                        target.url,
                    )
                    unreachable = failure.kind == "connect_error"
                    raise ProviderUnavailable(
                        "provider_unreachable" if unreachable else "upstream_error"
                    ) from None
                logger.warning(
                    "attempt %d of request %s failed: %s from %s; retrying",
                    exchange.attempts,
                    exchange.request_id,
                    failure.reason,
                    target.url,
                )
                self._metrics.upstream_retries.labels(failure.kind).inc()
                await self._backoff(exchange.attempts, same_target=len(set(tried)) == len(targets))
            finally:
                self._balancer.finished(target)

    async def _backoff(self, attempt: int, *, same_target: bool) -> None:
        # Another endpoint can be tried at once; the same one gets a short, jittered pause.
        if same_target:
            delay = self._retry_backoff_s * (2 ** (attempt - 1))
            await asyncio.sleep(random.uniform(delay / 2, delay))

    async def _attempt(
        self,
        request: web.Request,
        target: Target,
        body: bytes,
        headers: CIMultiDict[str],
        stream: bool,
        retry_error_event: bool,
        *,
        fresh: bool,
    ) -> _Held:
        """Open the upstream request and wait until the client's status can be decided.

        With ``fresh``, the request goes out on a new connection rather than a pooled one.
        """
        deadline = self._first_byte_timeout_s if stream else self._request_timeout_s
        upstream: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(deadline):
                upstream = await self._pool.request(
                    request.method,
                    target.url,
                    request.rel_url.raw_path_qs,
                    headers,
                    body,
                    fresh=fresh,
                )
                held = await self._hold(upstream, stream, retry_error_event)
        except UpstreamError as exc:
            if upstream is not None:
                upstream.close()
            # Only a malformed response head is a bad_response. A body cut short counts
            # as a connection failure, as a reset does.
            raise _ProviderFailure(
                str(exc),
                kind="bad_response" if isinstance(exc, BadResponse) else "connect_error",
                closed_before_response=isinstance(exc, ConnectionLost)
                and exc.reused
                and not exc.response_started,
            ) from exc
        except TimeoutError:
            if upstream is not None:
                upstream.close()
            logger.warning(
                "provider %s sent no %s within %.1f s",
                target.url,
                "first event" if stream else "complete response",
                deadline,
            )
            raise UpstreamTimeout(
                "The provider did not respond in time."
                + (" No event arrived within the first-byte timeout." if stream else "")
            ) from None
        except BaseException:
            if upstream is not None:
                upstream.close()
            raise
        return held

    async def _hold(
        self, upstream: UpstreamResponse, stream: bool, retry_error_event: bool
    ) -> _Held:
        """Read what decides the client's status: headers, and for streams the first event."""
        status = upstream.status
        if status in _PROVIDER_FAILURE_STATUSES:
            upstream.close()
            raise _ProviderFailure(f"upstream status {status}", kind="upstream_status")
        if status in _UPSTREAM_AUTH_STATUSES:
            upstream.close()
            logger.error(
                "provider %s rejected the gateway's credentials with status %d; check "
                "GATEWAY_UPSTREAM_TOKEN_FILE",
                upstream.origin,
                status,
            )
            raise ProviderUnavailable("upstream_auth_failed")

        is_sse = upstream.content_type == "text/event-stream"
        if not (stream and is_sse and status == 200):
            return await self._hold_body(upstream)

        buffer = bytearray()
        found: tuple[int, bytes] | None = None
        while len(buffer) <= FIRST_EVENT_HOLD_LIMIT:
            chunk = await upstream.readany()
            if not chunk:
                upstream.close()
                raise _ProviderFailure(
                    "upstream closed the stream before its first event", kind="incomplete"
                )
            buffer += chunk
            found = sse.find_first_event(buffer)
            if found is None:
                continue
            error = sse.upstream_error_in_event(found[1])
            if error is not None and retry_error_event:
                # Another provider may not be overloaded; this one is not failing.
                upstream.close()
                raise _ProviderFailure(
                    f"first event is an error with status {error[0]}",
                    kind="error_event",
                    counts_as_failure=False,
                )
            if error is not None:
                upstream.close()
                raise _UpstreamErrorEvent(*error)
            break
        first_event = found[1] if found is not None else b""
        return _Held(upstream, streaming=True, buffered=bytes(buffer), first_event=first_event)

    async def _hold_body(self, upstream: UpstreamResponse) -> _Held:
        """Read a whole body, or its first HELD_BODY_LIMIT bytes to relay the rest as it comes."""
        body = bytearray()
        while True:
            chunk = await upstream.readany()
            if not chunk:
                return _Held(upstream, streaming=False, buffered=bytes(body))
            body += chunk
            if len(body) > HELD_BODY_LIMIT:
                return _Held(upstream, streaming=True, buffered=bytes(body), event_stream=False)

    async def _relay_body(self, held: _Held, exchange: Exchange) -> web.StreamResponse:
        upstream = held.upstream
        exchange.bytes_out = len(held.buffered)
        if upstream.status >= 400:
            exchange.outcome = "upstream_error_status"
        upstream.release()
        headers = filter_response_headers(upstream.headers)
        return web.Response(status=upstream.status, headers=headers, body=held.buffered)

    async def _relay_stream(
        self, request: web.Request, held: _Held, exchange: Exchange
    ) -> web.StreamResponse:
        """Relay a stream as it arrives; failures end an SSE stream with one error event.

        A large non-SSE body that fails is cut off without its last chunk, so the client
        sees an incomplete response rather than a complete-looking one.
        """
        upstream = held.upstream
        headers = filter_response_headers(upstream.headers)
        if held.event_stream:
            headers["Cache-Control"] = "no-cache"
            headers["X-Accel-Buffering"] = "no"
        response = web.StreamResponse(status=upstream.status, headers=headers)
        relay = StreamRelay(upstream, held.buffered[-4:])
        failure: str | None = None
        task = asyncio.current_task()
        assert task is not None
        self._streams[task] = exchange

        try:
            # Send the status line and the held first bytes through aiohttp.
            writer = await response.prepare(request)
            assert writer is not None
            await response.write(held.buffered)
            exchange.ttft_ms = (time.monotonic() - exchange.started) * 1000
            exchange.bytes_out += len(held.buffered)

            # Relay the rest from the upstream callbacks when the client's response is
            # chunked, else read by read.
            client = chunked_client_transport(response, writer) if held.buffered else None
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
            elif held.event_stream and not sse.ends_at_event_boundary(relay.tail):
                failure = "upstream_incomplete"

            if failure is not None and not held.event_stream:
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

    @property
    def streams_in_flight(self) -> int:
        return len(self._streams)

    def abort_streams(self) -> int:
        """End every stream in flight with the ``shutting_down`` event; return how many."""
        for task in self._streams:
            self._aborting.add(task)
            task.cancel("gateway shutdown deadline")
        return len(self._streams)


class _UpstreamErrorEvent(Exception):
    """A pinned stream whose first event is an error: the client gets that status and JSON."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


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


def _completion_id(held: _Held) -> str | None:
    """Return the completion id of a successful response, read from a copy of its bytes."""
    if held.upstream.status != 200:
        return None
    if held.first_event:
        return completion_id_from_event(held.first_event)
    if not held.streaming:
        return completion_id_from_body(held.buffered)
    return None
