"""Sending a client request to a provider, with retries, until the client's status is decided.

One attempt has two phases. Before any byte reaches the client, a connection failure
or an upstream 500/502/504 may be retried (at most ``MAX_ATTEMPTS`` attempts), but a
timeout gets its 504 at once and is never retried. The response is held until the
client's status can be decided: a body up to ``HELD_BODY_LIMIT`` is sent whole, and a
stream or a larger body goes to ``proxy.relay``. Once the client's status line is out,
failures can only be reported inside the stream.

Foreign errors (``proxy.upstream`` client exceptions, asyncio timeouts) that come
before the client's status line are translated here and nowhere else into
``proxy.errors`` classes. ``proxy.relay`` translates the ones that come after it into
stream outcomes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

from proxy import sse
from proxy.completions import completion_id_from_body, completion_id_from_event
from proxy.errors import ProviderUnavailable, UpstreamTimeout
from proxy.headers import filter_response_headers
from proxy.metrics import Metrics
from proxy.relay import RelayedStreams
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
        self._streams = RelayedStreams(idle_timeout_s)
        self._first_byte_timeout_s = first_byte_timeout_s
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
                    return await self._streams.relay(
                        request,
                        held.upstream,
                        held.buffered,
                        exchange,
                        event_stream=held.event_stream,
                    )
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

    @property
    def streams_in_flight(self) -> int:
        return self._streams.in_flight

    def abort_streams(self) -> int:
        """End every stream in flight with the ``shutting_down`` event; return how many."""
        return self._streams.abort()


class _UpstreamErrorEvent(Exception):
    """A pinned stream whose first event is an error: the client gets that status and JSON."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _completion_id(held: _Held) -> str | None:
    """Return the completion id of a successful response, read from a copy of its bytes."""
    if held.upstream.status != 200:
        return None
    if held.first_event:
        return completion_id_from_event(held.first_event)
    if not held.streaming:
        return completion_id_from_body(held.buffered)
    return None
