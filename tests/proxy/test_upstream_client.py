"""The forwarding client against raw servers on 127.0.0.1 that control every byte.

Each server runs a small script per connection: split writes, odd framing, early
closes and resets, held responses. The client is used directly, without a gateway
around it; a few scenarios run again on uvloop, the loop of ``python -m proxy``.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import pytest
import trustme
from gateway_harness import WAIT_S, closed_port_url, poll_until
from multidict import CIMultiDict

from proxy.upstream import (
    BadResponse,
    ConnectError,
    ConnectionLost,
    PayloadError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from proxy.urlcheck import AddressPolicy

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

LOOPBACK = AddressPolicy.from_allow_list(["127.0.0.1/32"])
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class ScriptServer:
    """A server on 127.0.0.1 that runs ``script`` on each connection it accepts.

    ``connections`` counts accepted connections, ``requests`` records every request
    read, and ``peer_closed`` counts the connections that ``wait_client_close`` saw the
    client close.
    """

    def __init__(self, script: Script, *, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.peer_closed = 0
        self.changed = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> ScriptServer:
        self._server = await asyncio.start_server(self._run, "127.0.0.1", 0, ssl=self.tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel("script server stopped")
        for task in list(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self._server.wait_closed()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request (head and Content-Length body), record and return it."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        self.changed.set()
        return request

    async def wait_client_close(self, reader: asyncio.StreamReader) -> None:
        """Return once the client closed the connection, counting it in ``peer_closed``."""
        try:
            while await reader.read(65536):
                pass
        except ConnectionResetError:
            pass
        self.peer_closed += 1
        self.changed.set()

    async def wait_for(self, check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not check():
                self.changed.clear()
                await self.changed.wait()


def replying(*writes: bytes, keep_alive: bool = False) -> Callable[[ScriptServer], Script]:
    """Return a script that responds to each request with ``writes`` (one write each, drained)."""

    def bind(server: ScriptServer) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await server.read_request(reader)
                for part in writes:
                    writer.write(part)
                    await writer.drain()
                if not keep_alive:
                    return

        return script

    return bind


@asynccontextmanager
async def serving(
    bind: Callable[[ScriptServer], Script], *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[ScriptServer]:
    server = ScriptServer(lambda reader, writer: asyncio.sleep(0), tls=tls)
    server.script = bind(server)
    async with server:
        yield server


@asynccontextmanager
async def pool_of(**overrides: Any) -> AsyncIterator[UpstreamPool]:
    options: dict[str, Any] = {
        "limit_per_origin": 8,
        "keepalive_s": 30.0,
        "connect_timeout_s": 2.0,
    }
    options.update(overrides)
    policy = options.pop("policy", LOOPBACK)
    pool = UpstreamPool(policy, **options)
    try:
        yield pool
    finally:
        await pool.aclose()


async def post(
    pool: UpstreamPool,
    url: str,
    body: bytes = b"{}",
    *,
    target: str = "/v1/chat/completions",
    method: str = "POST",
    headers: CIMultiDict[str] | None = None,
    fresh: bool = False,
) -> UpstreamResponse:
    async with asyncio.timeout(WAIT_S):
        return await pool.request(method, url, target, headers or CIMultiDict(), body, fresh=fresh)


async def read_all(response: UpstreamResponse) -> bytes:
    """Read the body to its end and release the response."""
    body = bytearray()
    async with asyncio.timeout(WAIT_S):
        while chunk := await response.readany():
            body += chunk
    response.release()
    return bytes(body)


async def fetch(pool: UpstreamPool, url: str, **options: Any) -> tuple[UpstreamResponse, bytes]:
    response = await post(pool, url, **options)
    return response, await read_all(response)


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return framed + b"0\r\n" + trailer + b"\r\n"


def reset(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# Response framing.


async def test_status_line_split_across_writes_parsed() -> None:
    response = b"HTTP/1.1 200 OK\r\nX-Kept: yes\r\nContent-Length: 5\r\n\r\nhello"
    writes = tuple(response[i : i + 1] for i in range(len(response)))
    async with serving(replying(*writes)) as server, pool_of() as pool:
        answer, body = await fetch(pool, server.url)

    assert answer.status == 200
    assert answer.headers["X-Kept"] == "yes"
    assert body == b"hello"


async def test_chunked_body_with_extensions_and_trailers_reused() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    body = b"3;name=value\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Checksum: 1\r\n\r\n"
    async with serving(replying(head, body, keep_alive=True)) as server, pool_of() as pool:
        first, first_body = await fetch(pool, server.url)
        second, second_body = await fetch(pool, server.url)

    assert first.status == 200
    assert first.content_type == "text/event-stream"
    assert first_body == b"abcdefg"
    assert "X-Checksum" not in first.headers
    assert second_body == b"abcdefg"
    assert not first.reused_connection
    assert second.reused_connection
    assert server.connections == 1


AMBIGUOUS_OR_MALFORMED = {
    "length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n",
    "chunked-and-length": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 7\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 9\r\n",
    "same-length-twice": b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7\r\n",
    "length-list": b"HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n",
    "gzip-then-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n",
    "gzip-only": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n",
    "bad-status": b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n",
    "status-over-599": b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n",
    "status-under-100": b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n",
    "header-without-colon": b"HTTP/1.1 200 OK\r\nBroken header\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 7\r\n",
    "folded-header": b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n",
    "not-http": b"GARBAGE\r\n",
    "switching-protocols": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n"
    ),
}


@pytest.mark.parametrize("head", AMBIGUOUS_OR_MALFORMED.values(), ids=AMBIGUOUS_OR_MALFORMED.keys())
async def test_malformed_response_head_rejected(head: bytes) -> None:
    async with serving(replying(head + b"\r\n" + chunked(b"abcdefg"))) as server, pool_of() as pool:
        with pytest.raises(BadResponse) as raised:
            await post(pool, server.url)

    assert str(raised.value).startswith(("invalid HTTP response", "provider switched"))


async def test_oversized_response_head_rejected() -> None:
    filler = b"X-Filler: " + b"x" * 1000 + b"\r\n"
    head = b"HTTP/1.1 200 OK\r\n" + filler * 100 + b"Content-Length: 0\r\n\r\n"
    async with serving(replying(head)) as server, pool_of() as pool:
        with pytest.raises(BadResponse, match="response head over"):
            await post(pool, server.url)


async def test_close_delimited_body_ends_at_close() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    async with serving(replying(head, b"data: 1\n\n", b"data: 2\n\n")) as server:
        async with pool_of() as pool:
            _, first_body = await fetch(pool, server.url)
            second, _ = await fetch(pool, server.url)

    assert first_body == b"data: 1\n\ndata: 2\n\n"
    assert not second.reused_connection
    assert server.connections == 2


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_response_asking_to_close_not_reused(response: bytes) -> None:
    async with serving(replying(response, keep_alive=True)) as server, pool_of() as pool:
        _, first_body = await fetch(pool, server.url)
        second, _ = await fetch(pool, server.url)

    assert first_body == b"{}"
    assert not second.reused_connection
    assert server.connections == 2


async def test_interim_responses_skipped() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    async with serving(replying(interim, OK)) as server, pool_of() as pool:
        answer, body = await fetch(pool, server.url)

    assert answer.status == 200
    assert "Link" not in answer.headers
    assert answer.content_type == "application/json"
    assert body == b"{}"


async def test_head_response_has_no_body() -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n"
    async with serving(replying(response, keep_alive=True)) as server, pool_of() as pool:
        answer, body = await fetch(pool, server.url, method="HEAD", body=b"")
        second, _ = await fetch(pool, server.url, method="HEAD", body=b"")

    assert answer.status == 200
    assert body == b""
    assert not second.reused_connection


async def test_bytes_after_response_drop_connection() -> None:
    async with serving(replying(OK + b"HTTP/1.1 200 OK\r\n", keep_alive=True)) as server:
        async with pool_of() as pool:
            _, body = await fetch(pool, server.url)
            second, _ = await fetch(pool, server.url)

    assert body == b"{}"
    assert not second.reused_connection
    assert server.connections == 2


async def test_no_decompression_applied() -> None:
    compressed = (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae\x05\x00C\xbf\xa6\xa3\x02\x00\x00\x00"
    )
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
    async with serving(replying(head % len(compressed) + compressed)) as server:
        async with pool_of() as pool:
            answer, body = await fetch(pool, server.url)

    assert answer.headers["Content-Encoding"] == "gzip"
    assert body == compressed


# Connections that end early.


@pytest.mark.parametrize("ending", ["close", "reset"])
async def test_new_connection_lost_before_response(ending: str) -> None:
    def bind(server: ScriptServer) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            if ending == "reset":
                reset(writer)

        return script

    async with serving(bind) as server, pool_of() as pool:
        with pytest.raises(ConnectionLost) as raised:
            await post(pool, server.url)

    assert not raised.value.reused
    assert not raised.value.response_started


@pytest.mark.parametrize("ending", ["close", "reset"])
async def test_reused_connection_lost_before_response(ending: str) -> None:
    def bind(server: ScriptServer) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(OK)
            await server.read_request(reader)
            if ending == "reset":
                reset(writer)

        return script

    async with serving(bind) as server, pool_of() as pool:
        _, body = await fetch(pool, server.url)
        with pytest.raises(ConnectionLost) as raised:
            await post(pool, server.url)
        # The caller's retry opens a new connection.
        retried, retried_body = await fetch(pool, server.url, fresh=True)

    assert body == b"{}"
    assert raised.value.reused
    assert not raised.value.response_started
    assert retried_body == b"{}"
    assert not retried.reused_connection
    assert server.connections == 2


async def test_idle_connection_closed_by_server_replaced() -> None:
    async with serving(replying(OK)) as server, pool_of() as pool:
        _, body = await fetch(pool, server.url)
        # The server closed the connection after its response, and the pool drops it.
        await poll_until(lambda: not pool._connections)
        second, second_body = await fetch(pool, server.url)

    assert body == second_body == b"{}"
    assert not second.reused_connection
    assert server.connections == 2


async def test_body_cut_short_raises_payload_error() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    async with serving(replying(head + b"0123456789")) as server, pool_of() as pool:
        answer = await post(pool, server.url)
        received = await answer.readany()
        with pytest.raises(PayloadError):
            async with asyncio.timeout(WAIT_S):
                await answer.readany()
        answer.release()

    assert received == b"0123456789"


@pytest.mark.parametrize(
    "body",
    [b"5\r\nabcde\r\nzz\r\nabc\r\n0\r\n\r\n", b"5\r\nabcde\r\n9\r\nabc"],
    ids=["invalid-size", "cut-inside-chunk"],
)
async def test_broken_chunked_body_raises_payload_error(body: bytes) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with serving(replying(head, body)) as server, pool_of() as pool:
        answer = await post(pool, server.url)
        received = b""
        with pytest.raises(PayloadError):
            async with asyncio.timeout(WAIT_S):
                while chunk := await answer.readany():
                    received += chunk
        answer.release()

    assert received.startswith(b"abcde")


# Connection limit and keep-alive.


def held_replies(
    release: dict[bytes, asyncio.Event], order: list[bytes]
) -> Callable[[ScriptServer], Script]:
    """Respond to each request once the event named by its body is set; keep connections open."""

    def bind(server: ScriptServer) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                request = await server.read_request(reader)
                tag = request.partition(b"\r\n\r\n")[2]
                order.append(tag)
                await release.setdefault(tag, asyncio.Event()).wait()
                writer.write(OK)
                await writer.drain()

        return script

    return bind


async def test_requests_over_limit_wait_in_arrival_order() -> None:
    release: dict[bytes, asyncio.Event] = {}
    order: list[bytes] = []
    async with (
        serving(held_replies(release, order)) as server,
        serving(replying(OK)) as other,
        pool_of(limit_per_origin=2) as pool,
    ):
        tasks = {}
        for tag in (b"a", b"b", b"c", b"d"):
            tasks[tag] = asyncio.create_task(fetch(pool, server.url, body=tag), name=f"req-{tag!r}")
            await asyncio.sleep(0)
        await server.wait_for(lambda: len(order) == 2)
        # Another origin is not held up by the full one.
        _, other_body = await fetch(pool, other.url)

        release.setdefault(b"a", asyncio.Event()).set()
        await server.wait_for(lambda: len(order) == 3)
        release.setdefault(b"b", asyncio.Event()).set()
        await server.wait_for(lambda: len(order) == 4)
        for tag in (b"c", b"d"):
            release.setdefault(tag, asyncio.Event()).set()
        results = {tag: await task for tag, task in tasks.items()}

    assert other_body == b"{}"
    assert order == [b"a", b"b", b"c", b"d"]
    assert server.connections == 2
    assert results[b"c"][0].reused_connection
    assert results[b"d"][0].reused_connection
    assert all(body == b"{}" for _, body in results.values())


async def test_cancelled_waiter_gives_up_its_turn() -> None:
    release: dict[bytes, asyncio.Event] = {}
    order: list[bytes] = []
    async with serving(held_replies(release, order)) as server, pool_of(limit_per_origin=1) as pool:
        first = asyncio.create_task(fetch(pool, server.url, body=b"a"), name="first")
        await server.wait_for(lambda: len(order) == 1)
        waiting = asyncio.create_task(fetch(pool, server.url, body=b"b"), name="waiting")
        await asyncio.sleep(0)
        waiting.cancel("client left")
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release[b"a"].set()
        await first
        release.setdefault(b"c", asyncio.Event()).set()
        third, body = await fetch(pool, server.url, body=b"c")

    assert order == [b"a", b"c"]
    assert body == b"{}"
    assert third.reused_connection


async def test_idle_connection_closed_after_keepalive() -> None:
    def bind(server: ScriptServer) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(OK)
            await server.wait_client_close(reader)

        return script

    async with serving(bind) as server, pool_of(keepalive_s=0.3) as pool:
        _, body = await fetch(pool, server.url)
        released_at = time.monotonic()
        await server.wait_for(lambda: server.peer_closed == 1)
        idle_s = time.monotonic() - released_at
        second, _ = await fetch(pool, server.url)

    assert body == b"{}"
    # Expiry runs on the loop's clock, which uvloop reads once per loop iteration, so
    # the measured idle time may fall short of keepalive_s by part of an iteration.
    assert idle_s >= 0.3 - 0.05
    assert not second.reused_connection


# Connecting.


async def test_forbidden_address_never_connected() -> None:
    async with serving(replying(OK)) as server, pool_of(policy=AddressPolicy()) as pool:
        with pytest.raises(ConnectError, match="resolves only to forbidden addresses"):
            await post(pool, server.url)

    assert server.connections == 0


async def test_refused_connection_raises_connect_error() -> None:
    async with pool_of() as pool:
        with pytest.raises(ConnectError, match="connect failed"):
            await post(pool, closed_port_url())


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def test_tls_request_verified_with_given_context(tls_ca: trustme.CA) -> None:
    client_context = ssl.create_default_context()
    tls_ca.configure_trust(client_context)
    async with (
        serving(replying(OK, keep_alive=True), tls=server_tls(tls_ca)) as server,
        pool_of(ssl_context=client_context) as pool,
    ):
        first, first_body = await fetch(pool, server.url)
        second, _ = await fetch(pool, server.url)

    assert server.url.startswith("https://")
    assert first.status == 200
    assert first_body == b"{}"
    assert second.reused_connection


async def test_tls_untrusted_certificate_rejected(tls_ca: trustme.CA) -> None:
    async with serving(replying(OK), tls=server_tls(tls_ca)) as server, pool_of() as pool:
        with pytest.raises(ConnectError, match="TLS handshake failed"):
            await post(pool, server.url)


# Requests.


async def test_request_head_names_host_and_length() -> None:
    headers = CIMultiDict([("X-Request-Id", "r1"), ("Accept", "a"), ("Accept", "b")])
    async with serving(replying(OK, keep_alive=True)) as server, pool_of() as pool:
        port = server.url.rsplit(":", 1)[1]
        await fetch(pool, server.url + "/prefix", target="/v1/x?q=%2F", headers=headers)
        await fetch(pool, server.url, method="GET", body=b"", target="/v1/y")

    post_head, get_head = (request.split(b"\r\n") for request in server.requests)
    assert post_head[0] == b"POST /prefix/v1/x?q=%2F HTTP/1.1"
    assert post_head[1] == b"Host: 127.0.0.1:" + port.encode()
    assert post_head[2:7] == [
        b"X-Request-Id: r1",
        b"Accept: a",
        b"Accept: b",
        b"Content-Length: 2",
        b"",
    ]
    assert get_head[0] == b"GET /v1/y HTTP/1.1"
    assert not any(line.lower().startswith(b"content-length") for line in get_head)
    assert not any(line.lower().startswith(b"transfer-encoding") for line in get_head)


@pytest.mark.parametrize("value", ["a\r\nInjected: 1", "a\nb", "a\rb", "a\x00b"])
async def test_header_with_line_break_rejected(value: str) -> None:
    async with serving(replying(OK)) as server, pool_of() as pool:
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            await post(pool, server.url, headers=CIMultiDict([("X-Value", value)]))

    assert server.connections == 0


async def test_large_body_sent_whole() -> None:
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB
    async with serving(replying(OK)) as server, pool_of() as pool:
        _, answer = await fetch(pool, server.url, body=body)

    sent = server.requests[0].partition(b"\r\n\r\n")[2]
    assert answer == b"{}"
    assert hashlib.sha256(sent).digest() == hashlib.sha256(body).digest()


# Reading.


async def test_slow_reader_pauses_upstream_reading() -> None:
    body = bytes(range(256)) * (64 * 1024)  # 16 MiB
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    unsent: list[int] = []

    def bind(server: ScriptServer) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(head + body)
            # Report the bytes still queued in the server until they are all sent.
            while writer.transport.get_write_buffer_size():
                unsent.append(writer.transport.get_write_buffer_size())
                server.changed.set()
                await asyncio.sleep(0.02)

        return script

    async with serving(bind) as server, pool_of() as pool:
        answer = await post(pool, server.url)
        # Wait until the server's queue stops shrinking: the client stopped reading.
        await server.wait_for(lambda: len(unsent) >= 5 and unsent[-1] == unsent[-5])
        first = await answer.readany()
        rest = await read_all(answer)

    assert unsent[-1] > 0
    # What the client holds for a reader that does not read: about its high-water mark.
    assert len(first) <= 1024 * 1024
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(body).digest()


async def test_cancelled_read_closes_connection() -> None:
    def bind(server: ScriptServer) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await server.wait_client_close(reader)

        return script

    async with serving(bind) as server, pool_of() as pool:
        answer = await post(pool, server.url)
        reading = asyncio.create_task(answer.readany(), name="reading")
        await asyncio.sleep(0)
        try:
            reading.cancel("client disconnected")
            await reading
        except asyncio.CancelledError:
            answer.close()
        await server.wait_for(lambda: server.peer_closed == 1, timeout_s=1.0)

    assert server.peer_closed == 1


async def test_silence_raises_timeout_error_after_idle_timeout() -> None:
    def bind(server: ScriptServer) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfirs\r\n")
            await server.wait_client_close(reader)

        return script

    async with serving(bind) as server, pool_of() as pool:
        answer = await post(pool, server.url)
        first = await answer.readany(0.3)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await answer.readany(0.3)
        waited_s = time.monotonic() - started
        answer.close()

    assert first == b"firs"
    assert waited_s >= 0.3


async def test_pool_close_closes_connections() -> None:
    def bind(server: ScriptServer) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(OK)
            await server.wait_client_close(reader)

        return script

    async with serving(bind) as server:
        async with pool_of() as pool:
            _, body = await fetch(pool, server.url)
        await server.wait_for(lambda: server.peer_closed == 1)
        with pytest.raises(ConnectError, match="closed"):
            await post(pool, server.url)

    assert body == b"{}"


# Relaying the body to a sink from the protocol callbacks.


class RecordingSink:
    """A BodySink that keeps the pieces it receives; ``pause_after`` pauses reading."""

    def __init__(self, pause_after: UpstreamResponse | None = None) -> None:
        self.pieces: list[bytes] = []
        self.errors: list[UpstreamError | TimeoutError | None] = []
        self.ended = asyncio.Event()
        self.pause_after = pause_after

    def body_received(self, data: bytes) -> None:
        self.pieces.append(data)
        if self.pause_after is not None:
            self.pause_after.pause_reading()

    def body_ended(self, error: UpstreamError | TimeoutError | None) -> None:
        self.errors.append(error)
        self.ended.set()

    async def wait_ended(self) -> None:
        async with asyncio.timeout(WAIT_S):
            await self.ended.wait()


async def test_relay_passes_pieces_in_order_then_reuses() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = [b"data: %d\n\n" % i for i in range(20)]
    writes = [head, *(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces), b"0\r\n\r\n"]
    async with serving(replying(*writes, keep_alive=True)) as server, pool_of() as pool:
        answer = await post(pool, server.url)
        sink = RecordingSink()
        answer.relay(sink, WAIT_S)
        await sink.wait_ended()
        answer.release()
        second, second_body = await fetch(pool, server.url)

    assert b"".join(sink.pieces) == b"".join(pieces)
    assert sink.errors == [None]
    assert second.reused_connection
    assert second_body == b"".join(pieces)
    assert server.connections == 1


async def test_relay_silence_ends_with_timeout_error() -> None:
    def bind(server: ScriptServer) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfirs\r\n")
            await server.wait_client_close(reader)

        return script

    async with serving(bind) as server, pool_of() as pool:
        answer = await post(pool, server.url)
        sink = RecordingSink()
        started = time.monotonic()
        answer.relay(sink, 0.3)
        await sink.wait_ended()
        waited_s = time.monotonic() - started
        answer.close()
        await server.wait_for(lambda: server.peer_closed == 1)

    assert b"".join(sink.pieces) == b"firs"
    assert len(sink.errors) == 1
    assert isinstance(sink.errors[0], TimeoutError)
    assert waited_s >= 0.3


async def test_relay_cut_short_ends_with_payload_error() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    async with serving(replying(head, b"0123456789")) as server, pool_of() as pool:
        answer = await post(pool, server.url)
        sink = RecordingSink()
        answer.relay(sink, WAIT_S)
        await sink.wait_ended()
        answer.release()

    assert b"".join(sink.pieces) == b"0123456789"
    assert len(sink.errors) == 1
    assert isinstance(sink.errors[0], PayloadError)


async def test_relay_paused_past_idle_timeout_resumes() -> None:
    idle_s = 0.3
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    rest_written = asyncio.Event()

    def bind(server: ScriptServer) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(head + b"01234")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"56789")
            await writer.drain()
            rest_written.set()
            await server.wait_client_close(reader)

        return script

    async with serving(bind) as server, pool_of() as pool:
        answer = await post(pool, server.url)
        sink = RecordingSink(pause_after=answer)
        answer.relay(sink, idle_s)
        async with asyncio.timeout(WAIT_S):
            await rest_written.wait()
        # Reading stays paused for twice the idle timeout: a slow client, not a silent
        # provider, so the relay must not time out.
        await asyncio.sleep(2 * idle_s)
        pieces_while_paused = list(sink.pieces)
        ended_while_paused = sink.ended.is_set()
        sink.pause_after = None
        answer.resume_reading()
        await sink.wait_ended()
        answer.release()

    assert pieces_while_paused == [b"01234"]
    assert not ended_while_paused
    assert b"".join(sink.pieces) == b"0123456789"
    assert sink.errors == [None]


# The same scenarios on uvloop, which runs the gateway in production.

UVLOOP_CASES: list[Callable[[], Coroutine[Any, Any, None]]] = [
    test_status_line_split_across_writes_parsed,
    test_chunked_body_with_extensions_and_trailers_reused,
    test_close_delimited_body_ends_at_close,
    test_idle_connection_closed_by_server_replaced,
    test_body_cut_short_raises_payload_error,
    test_requests_over_limit_wait_in_arrival_order,
    test_idle_connection_closed_after_keepalive,
    test_large_body_sent_whole,
    test_slow_reader_pauses_upstream_reading,
    test_cancelled_read_closes_connection,
    test_silence_raises_timeout_error_after_idle_timeout,
    test_pool_close_closes_connections,
    test_relay_passes_pieces_in_order_then_reuses,
    test_relay_silence_ends_with_timeout_error,
    test_relay_cut_short_ends_with_payload_error,
    test_relay_paused_past_idle_timeout_resumes,
]


@pytest.mark.parametrize("case", UVLOOP_CASES, ids=lambda case: case.__name__)
def test_scenario_on_uvloop(case: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(case())
