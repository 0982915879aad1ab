"""The HTTP/1.1 client that forwards requests to providers, with a pool per origin.

``UpstreamPool.request`` sends one request and returns an ``UpstreamResponse`` once the
response head has arrived. Its ``readany`` returns the body as it arrives (or ``relay``
passes it to a ``BodySink`` from the protocol callbacks), and ``release`` gives the
connection back. Forwarding needs little of a general client (no
cookies, redirects, proxies or decompression) and runs once per request and once per
stream read, so this client does only that work, on asyncio protocols
(``proxy.upstream_connection``, with HTTP/1.1 parsing in ``proxy.upstream_http``).
aiohttp's ClientSession still serves the cold paths, such as attestation report fetches.

Connections are pooled per origin (scheme, host, port). An origin has at most
``limit_per_origin`` connections, open or being opened. Further requests to it wait in
FIFO order, and requests to other origins never wait for them. Idle connections are
reused LIFO: the most recently used one is the least likely to have been closed by the
provider's own idle timeout, and the surplus ages out. A connection goes back to the
pool only after its response was read completely and the provider did not ask to
close it. The pool closes idle connections after ``keepalive_s``.

Every resolved address is checked against the ``AddressPolicy`` before connecting.
``https`` origins use ``ssl.create_default_context()`` unless a context is given.
The exceptions are drawn in ``proxy.upstream_http`` and exported here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections import deque
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.upstream_connection import BodySink, UpstreamConnection
from proxy.upstream_http import (
    BadResponse,
    ConnectError,
    ConnectionLost,
    PayloadError,
    UpstreamError,
    request_head,
)
from proxy.urlcheck import AddressPolicy, ForbiddenAddress

__all__ = [
    "BadResponse",
    "BodySink",
    "ConnectError",
    "ConnectionLost",
    "PayloadError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
]


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """A provider base URL, parsed once."""

    key: tuple[str, str, int]
    host: str
    port: int
    tls: bool
    host_header: str
    base_path: str
    origin: str


class UpstreamPool:
    """Connections to providers, pooled per origin; close it with ``aclose``."""

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        limit_per_origin: int,
        keepalive_s: float,
        connect_timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._policy = policy
        self.limit_per_origin = limit_per_origin
        self.keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._ssl_context = ssl_context
        self._endpoints: dict[str, _Endpoint] = {}
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._connections: set[UpstreamConnection] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        base_url: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        fresh: bool = False,
    ) -> UpstreamResponse:
        """Send a request and return the response once its head has arrived.

        ``target`` (path and query) is appended to the path of ``base_url``. ``headers``
        must not contain Host, Content-Length or hop-by-hop headers: this method sets
        Host and Content-Length. With ``fresh``, a new connection is opened even when an
        idle one exists. Raises UpstreamError; the caller's cancellation closes the
        connection.
        """
        if self._closed:
            raise ConnectError("the upstream connection pool is closed")
        endpoint = self._endpoint(base_url)
        head = request_head(
            method, endpoint.base_path + target, endpoint.host_header, headers, len(body)
        )
        origin = self._origins.get(endpoint.key)
        if origin is None:
            origin = self._new_origin(endpoint)

        connection = await origin.acquire(fresh)
        try:
            connection.begin(method)
            await connection.send(head, body)
            await connection.read_head()
        except BaseException:
            connection.abort()
            raise
        return UpstreamResponse(connection, endpoint.origin)

    async def aclose(self) -> None:
        """Close every connection, idle or in use, and wait up to 1 s for the sockets to close."""
        self._closed = True
        for origin in list(self._origins.values()):
            origin.close()
        connections = list(self._connections)
        for connection in connections:
            connection.close()
        waits = [
            connection.socket_closed
            for connection in connections
            if not connection.socket_closed.done()
        ]
        if waits:
            await asyncio.wait(waits, timeout=1.0)
        for connection in connections:
            connection.abort()

    def _endpoint(self, base_url: str) -> _Endpoint:
        endpoint = self._endpoints.get(base_url)
        if endpoint is not None:
            return endpoint
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.raw_host or url.port is None:
            raise ConnectError(f"invalid provider URL {base_url!r}")
        tls = url.scheme == "https"
        endpoint = _Endpoint(
            key=(url.scheme, url.raw_host, url.port),
            host=url.raw_host,
            port=url.port,
            tls=tls,
            host_header=url.host_port_subcomponent or url.raw_host,
            base_path=url.raw_path.rstrip("/"),
            origin=str(url.origin()),
        )
        # Provider URLs come and go with registrations; an occasional reset bounds the cache.
        if len(self._endpoints) >= 4096:
            self._endpoints.clear()
        self._endpoints[base_url] = endpoint
        return endpoint

    def _new_origin(self, endpoint: _Endpoint) -> _Origin:
        # Origins come and go with registrations: drop the unused ones now and then. An
        # origin without connections or waiters is referenced by no task.
        if len(self._origins) >= 1024:
            for key, unused in list(self._origins.items()):
                if unused.open == 0 and not unused.waiters:
                    unused.close()
                    del self._origins[key]
        origin = self._origins[endpoint.key] = _Origin(self, endpoint)
        return origin

    async def _open(self, origin: _Origin) -> UpstreamConnection:
        """Resolve the origin's host, check every address against the policy, and connect."""
        endpoint = origin.endpoint
        loop = asyncio.get_running_loop()
        addresses = await self._resolve(endpoint.host, endpoint.port)
        failure = ""
        for family, address in addresses:
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    _, connection = await loop.create_connection(
                        lambda: UpstreamConnection(origin),
                        address,
                        endpoint.port,
                        family=family,
                        ssl=self._client_ssl_context() if endpoint.tls else None,
                        server_hostname=endpoint.host if endpoint.tls else None,
                    )
            except TimeoutError:
                failure = "connect timed out"
            except ssl.SSLError as exc:
                failure = f"TLS handshake failed: {exc.reason or exc}"
            except OSError as exc:
                failure = f"connect failed: {exc.strerror or type(exc).__name__}"
            else:
                self._connections.add(connection)
                return connection
        raise ConnectError(failure)

    async def _resolve(self, host: str, port: int) -> list[tuple[socket.AddressFamily, str]]:
        """Return the allowed addresses of ``host``; raise ConnectError when none is allowed."""
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            results = [(_family(literal), str(literal))]
        else:
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except TimeoutError:
                raise ConnectError(f"resolving {host!r} timed out") from None
            except OSError as exc:
                raise ConnectError(f"cannot resolve {host!r}: {exc.strerror or exc}") from exc
            results = [(info[0], str(info[4][0])) for info in infos]
        try:
            allowed = self._policy.allowed_addresses(host, [address for _, address in results])
        except ForbiddenAddress as exc:
            raise ConnectError(f"connect failed: {exc}") from exc
        # getaddrinfo lists an address once per protocol; keep the first of each.
        return list(dict.fromkeys(item for item in results if item[1] in allowed))

    def _client_ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context


def _family(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> socket.AddressFamily:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


class _Origin:
    """The connections to one (scheme, host, port) and the requests waiting for one."""

    def __init__(self, pool: UpstreamPool, endpoint: _Endpoint) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.open = 0
        """Connections open or being opened, idle ones included: at most the limit."""
        self.idle: deque[UpstreamConnection] = deque()
        """Idle connections, the most recently used at the right end."""
        self.waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        """Requests waiting at the limit, in arrival order. A waiter gets a connection,
        or None when a connection slot is reserved for it."""
        self._sweep: asyncio.TimerHandle | None = None

    async def acquire(self, fresh: bool) -> UpstreamConnection:
        """Return an idle connection, a new one, or one handed over after a wait.

        With ``fresh``, no idle connection is taken. NOTE: at the limit, a fresh request
        waits like any other and may be handed a pooled connection.
        """
        if not fresh:
            connection = self._take_idle()
            if connection is not None:
                return connection
        elif self.open >= self.pool.limit_per_origin:
            # Make room for the new connection by closing the longest-idle one, if any.
            self._close_oldest_idle()

        if self.open < self.pool.limit_per_origin and not self.waiters:
            self.open += 1
            return await self._connect_reserved()

        waiter: asyncio.Future[UpstreamConnection | None] = (
            asyncio.get_running_loop().create_future()
        )
        self.waiters.append(waiter)
        try:
            handed = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The hand-over raced with the cancellation: pass it on.
                self._pass_on(waiter.result())
            else:
                self.waiters.remove(waiter)
            raise
        if handed is None:
            return await self._connect_reserved()
        return handed

    async def _connect_reserved(self) -> UpstreamConnection:
        """Open a connection in a slot already counted in ``open``."""
        try:
            return await self.pool._open(self)
        except BaseException:
            self.open -= 1
            self._wake_next()
            raise

    def _take_idle(self) -> UpstreamConnection | None:
        now = asyncio.get_running_loop().time()
        while self.idle:
            connection = self.idle.pop()
            if connection.discarded:
                continue
            if now - connection.idle_since >= self.pool.keepalive_s:
                # Older than the keep-alive time, and so is every connection left of it.
                connection.close()
                continue
            return connection
        return None

    def _close_oldest_idle(self) -> None:
        while self.idle:
            connection = self.idle.popleft()
            if not connection.discarded:
                connection.close()
                return

    def _pass_on(self, connection: UpstreamConnection | None) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        if connection is None:
            self.open -= 1
            return
        loop = asyncio.get_running_loop()
        connection.idle_since = loop.time()
        self.idle.append(connection)
        if self._sweep is None:
            self._sweep = loop.call_at(
                self.idle[0].idle_since + self.pool.keepalive_s, self._close_expired
            )

    # ConnectionOwner

    def put(self, connection: UpstreamConnection) -> None:
        """Hand a reusable connection to the first waiter, or keep it idle."""
        self._pass_on(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        self.open -= 1
        self._wake_next()

    def closed(self, connection: UpstreamConnection) -> None:
        self.pool._connections.discard(connection)

    def _wake_next(self) -> None:
        # A freed slot goes to the first waiter, reserved before it runs.
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.open += 1
                waiter.set_result(None)
                return

    def _close_expired(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        while self.idle and (
            self.idle[0].discarded or now - self.idle[0].idle_since >= self.pool.keepalive_s
        ):
            connection = self.idle.popleft()
            if not connection.discarded:
                connection.close()
        if self.idle:
            self._sweep = asyncio.get_running_loop().call_at(
                self.idle[0].idle_since + self.pool.keepalive_s, self._close_expired
            )

    def close(self) -> None:
        """Fail every waiter and close the idle connections (pool shutdown)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectError("the upstream connection pool is closed"))
        while self.idle:
            self.idle.pop().close()


class UpstreamResponse:
    """A response whose head has arrived; read its body with ``readany``.

    Call ``release`` when done with it (or ``close`` to drop the connection); both are
    idempotent. A response not read to its end is never reused.
    """

    __slots__ = ("_connection", "_headers", "_raw_headers", "origin", "reused_connection", "status")

    def __init__(self, connection: UpstreamConnection, origin: str) -> None:
        self._connection: UpstreamConnection | None = connection
        self._raw_headers = connection.raw_headers
        self._headers: CIMultiDictProxy[str] | None = None
        self.status = connection.status
        self.origin = origin
        """The provider's scheme, host and port, for logs."""
        self.reused_connection = connection.exchanges > 0

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            # Decoded as aiohttp's parser decodes them (UTF-8 with surrogateescape), so
            # they reach the client as they did through aiohttp's client.
            self._headers = CIMultiDictProxy(
                CIMultiDict(
                    (
                        name.decode("utf-8", "surrogateescape"),
                        value.decode("utf-8", "surrogateescape"),
                    )
                    for name, value in self._raw_headers
                )
            )
        return self._headers

    @property
    def content_type(self) -> str:
        """The media type of Content-Type, lowercased, without parameters ("" when absent)."""
        return self.headers.get("Content-Type", "").partition(";")[0].strip().lower()

    async def readany(self, idle_timeout_s: float | None = None) -> bytes:
        """Return the body bytes that have arrived, waiting when there are none; b"" at the end.

        Raises PayloadError when the body ends early, and TimeoutError when nothing
        arrives within ``idle_timeout_s``.
        """
        connection = self._connection
        if connection is None:
            raise RuntimeError("the response was released")
        if connection.buffered:
            return connection.take_buffered()
        return await connection.read_body(idle_timeout_s)

    def relay(self, sink: BodySink, idle_timeout_s: float) -> None:
        """Pass the rest of the body to ``sink`` as it arrives; see UpstreamConnection.relay_body.

        ``readany`` must not be called afterwards. ``release`` or ``close`` still ends
        the response, and ``close`` ends the relay with ``sink.body_ended``.
        """
        connection = self._connection
        if connection is None:
            raise RuntimeError("the response was released")
        connection.relay_body(sink, idle_timeout_s)

    def pause_reading(self) -> None:
        """Stop reading the body from the provider while the client catches up."""
        if self._connection is not None:
            self._connection.pause_reading()

    def resume_reading(self) -> None:
        if self._connection is not None:
            self._connection.resume_reading()

    def release(self) -> None:
        """Return the connection to the pool if the response was read to its end, else close it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finish()

    def close(self) -> None:
        """Close the connection at once."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()
