"""Streams relayed from the upstream connection's callbacks: bytes, slow clients, failures."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import orjson
import pytest
from gateway_harness import (
    WAIT_S,
    Admin,
    GatewayStarter,
    SettingsFactory,
    chat_body,
    chat_events,
    new_key,
    poll_until,
)
from relay_harness import logged_faults, raw_request, read_raw_response

from proxy.relay import StreamRelay
from proxy.server import RunningGateway

COMPLETIONS = "/v1/chat/completions"
IDLE_S = 0.5
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
CHUNKED_SSE_HEAD = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"

# How soon the provider must see its connection closed after the client left.
UPSTREAM_CLOSE_S = 1.0

# The slow-client cases: events of 64 KiB, 32 MiB in all, more than the kernel
# buffers between the provider and a stalled client can hold on loopback.
BIG_EVENT_PAD = 64 * 1024
BIG_EVENT_COUNT = 512

Script = Callable[["ScriptProvider", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptProvider:
    """A provider that reads one request per connection and then runs ``script``.

    ``sent`` counts the body bytes the script wrote, ``digest`` hashes them, and
    ``closed`` is set once the gateway closed the connection.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.sent = 0
        self.digest = hashlib.sha256()
        self.closed = asyncio.Event()
        self.url = ""

    def write(self, writer: asyncio.StreamWriter, body_part: bytes, framed: bytes) -> None:
        """Write ``framed`` (``body_part`` in its transfer coding) and count the part."""
        writer.write(framed)
        self.sent += len(body_part)
        self.digest.update(body_part)

    async def wait_closed_by_gateway(self, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(65536):
                pass
        except ConnectionResetError:
            pass
        self.closed.set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed.set()
        finally:
            writer.close()


@asynccontextmanager
async def script_provider(script: Script) -> AsyncIterator[ScriptProvider]:
    provider = ScriptProvider(script)
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)  # type: ignore[arg-type]
        try:
            await provider.serve(reader, writer)
        finally:
            tasks.discard(task)  # type: ignore[arg-type]

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    provider.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield provider
    finally:
        server.close()
        for task in list(tasks):
            task.cancel("script provider stopped")
        for task in list(tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass
        await server.wait_closed()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def big_event(index: int) -> bytes:
    return b'data: {"i":%d,"pad":"%s"}\n\n' % (index, b"x" * BIG_EVENT_PAD)


async def write_big_stream(
    provider: ScriptProvider, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Write BIG_EVENT_COUNT events of 64 KiB, each drained, then [DONE]."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    writer.write(CHUNKED_SSE_HEAD)
    watch = asyncio.create_task(provider.wait_closed_by_gateway(reader), name="watch-close")
    try:
        for index in range(BIG_EVENT_COUNT):
            event = big_event(index)
            provider.write(writer, event, chunk(event))
            await writer.drain()
        done = chat_events(0)[-1]
        provider.write(writer, done, chunk(done) + b"0\r\n\r\n")
        await writer.drain()
        await watch
    finally:
        watch.cancel("big stream written")


async def stalled_client(
    gateway: RunningGateway, key: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection with a small receive buffer and send a stream request on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = orjson.dumps(chat_body())
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"X-Model-Pub-Key: " + key.encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return reader, writer


async def wait_provider_stalled(provider: ScriptProvider) -> None:
    """Return once the provider's count of sent bytes stops growing for 0.25 s."""
    counts: list[int] = []

    def stalled() -> bool:
        counts.append(provider.sent)
        return len(counts) >= 6 and counts[-1] == counts[-6]

    await poll_until(stalled, interval_s=0.05, timeout_s=3 * WAIT_S)


@pytest.fixture
async def gateway(
    start_gateway_with: GatewayStarter, make_settings: SettingsFactory
) -> RunningGateway:
    """A gateway with an idle timeout of IDLE_S."""
    return await start_gateway_with(make_settings(idle_timeout_s=IDLE_S))


@pytest.fixture
def relay_starts(monkeypatch: pytest.MonkeyPatch) -> list[StreamRelay]:
    """Record every relay that starts writing from the upstream callbacks."""
    started: list[StreamRelay] = []
    start = StreamRelay.start

    def recording_start(relay: StreamRelay, *args: object, **kwargs: object) -> None:
        started.append(relay)
        start(relay, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(StreamRelay, "start", recording_start)
    return started


def outcomes(caplog: pytest.LogCaptureFixture) -> list[object]:
    return [
        getattr(record, "outcome", None)
        for record in caplog.records
        if record.name == "proxy.access" and getattr(record, "path", None) == COMPLETIONS
    ]


def last_error_code(body: bytes) -> str:
    last_event = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    error: dict[str, str] = orjson.loads(last_event.removeprefix(b"data: "))["error"]
    return error["code"]


# Bytes.


async def test_separate_events_relayed_from_callbacks(
    gateway: RunningGateway,
    admin: Admin,
    http: aiohttp.ClientSession,
    relay_starts: list[StreamRelay],
) -> None:
    events = chat_events(200)

    async def script(
        provider: ScriptProvider, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_SSE_HEAD)
        for event in events:
            provider.write(writer, event, chunk(event))
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(b"0\r\n\r\n")

    key = new_key()
    async with script_provider(script) as provider:
        await admin.register(key, provider.url)
        received = bytearray()
        async with http.post(
            gateway.url + COMPLETIONS,
            data=orjson.dumps(chat_body()),
            headers={"X-Model-Pub-Key": key},
        ) as response:
            async for part in response.content.iter_any():
                received += part

    assert response.status == 200
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert bytes(received) == b"".join(events)
    assert len(relay_starts) == 1
    # The held first event went out through aiohttp, the later events through the relay.
    assert 0 < relay_starts[0].bytes_out < len(received)
    assert relay_starts[0].ended
    assert relay_starts[0].error is None


async def test_http10_client_relayed_read_by_read(
    gateway: RunningGateway, admin: Admin, relay_starts: list[StreamRelay]
) -> None:
    events = chat_events(20)

    async def script(
        provider: ScriptProvider, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_SSE_HEAD)
        for event in events:
            provider.write(writer, event, chunk(event))
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(b"0\r\n\r\n")

    key = new_key()
    body = orjson.dumps(chat_body())
    async with script_provider(script) as provider:
        await admin.register(key, provider.url)
        answer = await raw_request(
            gateway.url,
            b"POST /v1/chat/completions HTTP/1.0\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"X-Model-Pub-Key: " + key.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        )

    # aiohttp cannot use chunked coding for HTTP/1.0: the body ends with the connection.
    assert answer.status == 200
    assert "Transfer-Encoding" not in answer.headers
    assert answer.body == b"".join(events)
    assert relay_starts == []


# A client that stops reading.


async def test_stalled_client_pauses_provider_then_resumes(
    gateway: RunningGateway, admin: Admin, relay_starts: list[StreamRelay]
) -> None:
    key = new_key()
    async with script_provider(write_big_stream) as provider:
        await admin.register(key, provider.url)
        tracemalloc.start()
        try:
            reader, writer = await stalled_client(gateway, key)
            await wait_provider_stalled(provider)
            held_bytes, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Reading stays stopped for twice the idle timeout: the provider is not silent,
        # the client is slow, so the stream must not end with an idle timeout.
        await asyncio.sleep(2 * IDLE_S)
        sent_while_stalled = provider.sent

        async with asyncio.timeout(WAIT_S):
            answer = await read_raw_response(reader)
        writer.close()

    total = BIG_EVENT_COUNT * len(big_event(0))
    assert sent_while_stalled < total // 2
    # The gateway's and the client's buffers in this process: a relay that ignored the
    # stalled client would hold most of the bytes the provider sent.
    assert held_bytes < 4 * 1024 * 1024, held_bytes
    assert answer.status == 200
    assert hashlib.sha256(answer.body).hexdigest() == provider.digest.hexdigest()
    assert answer.body.endswith(b"data: [DONE]\n\n")
    assert len(relay_starts) == 1
    assert relay_starts[0].error is None


async def test_stalled_client_leaving_closes_upstream(
    gateway: RunningGateway, admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    key = new_key()
    async with script_provider(write_big_stream) as provider:
        await admin.register(key, provider.url)
        _, writer = await stalled_client(gateway, key)
        await wait_provider_stalled(provider)
        sock = writer.get_extra_info("socket")
        # An RST, as from a client process that was killed with unread data.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        left_at = time.monotonic()
        async with asyncio.timeout(UPSTREAM_CLOSE_S):
            await provider.closed.wait()
        upstream_closed_after = time.monotonic() - left_at
        await poll_until(lambda: gateway.gateway.forwarder.streams_in_flight == 0)

    assert upstream_closed_after < UPSTREAM_CLOSE_S
    assert outcomes(caplog) == ["client_disconnect"]
    assert logged_faults(caplog.records) == []


# Provider failures after the first event.


async def test_silence_after_relayed_events_ends_with_idle_event(
    gateway: RunningGateway,
    admin: Admin,
    http: aiohttp.ClientSession,
    relay_starts: list[StreamRelay],
) -> None:
    events = chat_events(5)[:5]

    async def script(
        provider: ScriptProvider, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_SSE_HEAD)
        for event in events:
            provider.write(writer, event, chunk(event))
            await writer.drain()
            await asyncio.sleep(0.01)
        await provider.wait_closed_by_gateway(reader)

    key = new_key()
    async with script_provider(script) as provider:
        await admin.register(key, provider.url)
        started = time.monotonic()
        async with http.post(
            gateway.url + COMPLETIONS,
            data=orjson.dumps(chat_body()),
            headers={"X-Model-Pub-Key": key},
        ) as response:
            body = await response.read()
        elapsed = time.monotonic() - started
        async with asyncio.timeout(UPSTREAM_CLOSE_S):
            await provider.closed.wait()

    assert response.status == 200
    assert body.startswith(b"".join(events))
    assert last_error_code(body) == "upstream_idle_timeout"
    assert elapsed >= IDLE_S
    assert len(relay_starts) == 1
    assert relay_starts[0].bytes_out > 0
    assert isinstance(relay_starts[0].error, TimeoutError)


async def test_reset_after_relayed_events_ends_with_reset_event(
    gateway: RunningGateway,
    admin: Admin,
    http: aiohttp.ClientSession,
    relay_starts: list[StreamRelay],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    events = chat_events(5)[:5]

    async def script(
        provider: ScriptProvider, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(CHUNKED_SSE_HEAD)
        for event in events:
            provider.write(writer, event, chunk(event))
            await writer.drain()
            await asyncio.sleep(0.01)
        # Give the gateway time to read the events: an RST discards unread data.
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    key = new_key()
    async with script_provider(script) as provider:
        await admin.register(key, provider.url)
        async with http.post(
            gateway.url + COMPLETIONS,
            data=orjson.dumps(chat_body()),
            headers={"X-Model-Pub-Key": key},
        ) as response:
            body = await response.read()

    assert response.status == 200
    assert body.startswith(b"".join(events))
    assert last_error_code(body) == "upstream_reset"
    assert b"[DONE]" not in body
    assert outcomes(caplog) == ["upstream_reset"]
    assert len(relay_starts) == 1
    assert relay_starts[0].bytes_out > 0
