"""Request bodies: large ones pass byte for byte, oversized ones stop early and cheaply."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from gateway_harness import MODEL, Admin, FakeClock, SettingsFactory, fetch, new_key, post_chat
from relay_harness import RawProvider, RawResponse, read_raw_response
from yarl import URL

from proxy.config import Settings
from proxy.server import RunningGateway, start_gateway
from registry import MemoryRegistry
from registry.types import ProviderEntry

MIB = 1024 * 1024
DEFAULT_LIMIT = 32 * MIB
JSON_REPLY = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'
OK_REPLY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(JSON_REPLY), JSON_REPLY)
)


class CountingRegistry(MemoryRegistry):
    """A memory registry that counts the lookups made to route client requests."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.lookups = 0

    async def get(self, pubkey: str) -> ProviderEntry | None:
        self.lookups += 1
        return await super().get(pubkey)

    async def by_model(self, model: str) -> list[ProviderEntry]:
        self.lookups += 1
        return await super().by_model(model)


GatewayWithRegistry = tuple[RunningGateway, CountingRegistry]


@pytest.fixture
async def start_counted(
    make_settings: SettingsFactory, clock: FakeClock
) -> AsyncIterator[Callable[..., Any]]:
    """Return a starter of gateways on a CountingRegistry; settings overrides as keywords."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> GatewayWithRegistry:
            registry = CountingRegistry(clock)
            stack.push_async_callback(registry.aclose)
            running = await start_gateway(make_settings(**overrides), registry=registry)
            stack.push_async_callback(running.stop)
            return running, registry

        yield start


def image_body(size: int) -> bytes:
    """Return a chat request of about ``size`` bytes whose bulk is base64 PNG data URIs."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Compare these images: été, 東京."}]
    remaining = size
    while remaining > 0:
        raw = os.urandom(min(remaining, 4 * MIB) * 3 // 4)
        url = "data:image/png;base64," + base64.b64encode(raw).decode()
        parts.append({"type": "image_url", "image_url": {"url": url}})
        remaining -= len(url)
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts}]}
    return orjson.dumps(body)


def forwarded_body(provider: RawProvider) -> bytes:
    return provider.requests[-1].partition(b"\r\n\r\n")[2]


def chat_head(key: str, *lines: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"X-Model-Pub-Key: "
        + key.encode()
        + b"\r\n"
        + b"".join(line + b"\r\n" for line in lines)
        + b"\r\n"
    )


async def send_chunked_until_stopped(
    url: str, head: bytes, *, max_bytes: int, chunk_bytes: int = 64 * 1024
) -> tuple[RawResponse | None, int]:
    """Send a chunked body until the gateway responds or closes, or ``max_bytes`` are out.

    Returns the response (None when the connection closed without one) and the body
    bytes sent. Raises TimeoutError when the gateway neither responds nor reads.
    """
    target = URL(url)
    assert target.host is not None
    assert target.port is not None
    chunk = b"a" * chunk_bytes
    size_line = b"%x\r\n" % chunk_bytes
    sent = 0
    async with asyncio.timeout(15):
        reader, writer = await asyncio.open_connection(target.host, target.port)
        answer = asyncio.create_task(read_raw_response(reader), name="read-413")
        try:
            writer.write(head)
            while sent < max_bytes and not answer.done():
                writer.write(size_line)
                writer.write(chunk)
                writer.write(b"\r\n")
                await writer.drain()
                sent += chunk_bytes
        except ConnectionError:
            pass
        try:
            response: RawResponse | None = await answer
        except (ConnectionError, asyncio.IncompleteReadError):
            response = None
        finally:
            writer.close()
    return response, sent


# Large bodies pass.


@pytest.mark.parametrize("size", [3 * MIB // 2, 30 * MIB], ids=["1.5MiB", "30MiB"])
async def test_large_body_forwarded_byte_exact(
    gateway: RunningGateway, admin: Admin, http: aiohttp.ClientSession, size: int
) -> None:
    body = image_body(size)
    key = new_key()
    async with RawProvider(OK_REPLY) as provider:
        await admin.register(key, provider.url)
        # A file-like body: aiohttp warns about large bytes bodies sent in one write.
        answer = await fetch(
            http,
            "POST",
            gateway.url + "/v1/chat/completions",
            data=io.BytesIO(body),
            headers={"X-Model-Pub-Key": key, "Content-Type": "application/json"},
        )

    assert size <= len(body) < DEFAULT_LIMIT
    assert answer.status == 200
    assert answer.body == JSON_REPLY
    assert hashlib.sha256(forwarded_body(provider)).digest() == hashlib.sha256(body).digest()


async def test_large_body_resent_whole_on_retry(
    gateway: RunningGateway, admin: Admin, http: aiohttp.ClientSession
) -> None:
    body = image_body(2 * MIB)
    key = new_key()
    async with RawProvider(OK_REPLY) as provider:
        # The first connection closes before any response byte: the body goes out again.
        provider.then("close")
        await admin.register(key, provider.url)
        answer = await fetch(
            http,
            "POST",
            gateway.url + "/v1/chat/completions",
            data=io.BytesIO(body),
            headers={"X-Model-Pub-Key": key, "Content-Type": "application/json"},
        )

    assert answer.status == 200
    assert len(provider.requests) == 2
    assert provider.requests[0].partition(b"\r\n\r\n")[2] == body
    assert provider.requests[1].partition(b"\r\n\r\n")[2] == body


# Oversized bodies stop early.


@asynccontextmanager
async def declared_oversize(
    gateway: RunningGateway, key: str
) -> AsyncIterator[tuple[RawResponse, asyncio.StreamReader]]:
    """Declare a 200 MiB body, send a few bytes of it; yield the response and the reader."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(chat_head(key, b"Content-Length: 209715200") + b'{"model": "')
        async with asyncio.timeout(5):
            answer = await read_raw_response(reader)
        yield answer, reader
    finally:
        writer.close()


async def test_declared_length_over_limit_rejected_from_header(
    start_counted: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    gateway, registry = await start_counted()
    key = new_key()
    async with RawProvider(OK_REPLY) as provider:
        await Admin(http, gateway.admin_url).register(key, provider.url)
        lookups_before = registry.lookups
        async with declared_oversize(gateway, key) as (answer, _):
            pass

    error = orjson.loads(answer.body)["error"]
    assert answer.status == 413
    assert error["code"] == "request_too_large"
    assert error["type"] == "invalid_request_error"
    assert answer.headers["X-Request-Id"]
    assert answer.headers["Connection"] == "close"
    assert registry.lookups == lookups_before
    assert provider.connections == 0


async def test_declared_length_over_limit_closes_connection(gateway: RunningGateway) -> None:
    async with declared_oversize(gateway, new_key()) as (answer, reader):
        answered_at = time.monotonic()
        async with asyncio.timeout(2.0):
            remainder = await reader.read()
        closed_after = time.monotonic() - answered_at

    assert answer.status == 413
    assert remainder == b""
    assert closed_after < 1.0


async def test_endless_chunked_body_stopped_at_limit(
    start_counted: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    gateway, registry = await start_counted()
    key = new_key()
    async with RawProvider(OK_REPLY) as provider:
        await Admin(http, gateway.admin_url).register(key, provider.url)
        tracemalloc.start()
        try:
            response, sent = await send_chunked_until_stopped(
                gateway.url,
                chat_head(key, b"Transfer-Encoding: chunked"),
                max_bytes=40 * MIB,
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    assert DEFAULT_LIMIT <= sent < 40 * MIB
    assert response is None or response.status == 413
    assert registry.lookups == 0
    assert provider.connections == 0
    # The body read so far, grown in steps, plus what aiohttp's reader buffers.
    assert peak < 1.25 * DEFAULT_LIMIT, peak


# A configured limit.


@pytest.fixture
async def small_limit(start_counted: Callable[..., Any]) -> GatewayWithRegistry:
    """A gateway whose body limit comes from GATEWAY_MAX_BODY_BYTES=65536."""
    limit = Settings.from_env({"GATEWAY_MAX_BODY_BYTES": "65536"}).max_body_bytes
    started: GatewayWithRegistry = await start_counted(max_body_bytes=limit)
    return started


def padded_body(size: int) -> bytes:
    """Return a chat request of exactly ``size`` bytes."""
    empty = orjson.dumps({"model": MODEL, "messages": [], "pad": ""})
    return orjson.dumps({"model": MODEL, "messages": [], "pad": "x" * (size - len(empty))})


async def test_body_at_configured_limit_forwarded(
    small_limit: GatewayWithRegistry, http: aiohttp.ClientSession
) -> None:
    gateway, _ = small_limit
    body = padded_body(65536)
    key = new_key()
    async with RawProvider(OK_REPLY) as provider:
        await Admin(http, gateway.admin_url).register(key, provider.url)
        answer = await post_chat(http, gateway, pubkey=key, body=body)

    assert len(body) == 65536
    assert answer.status == 200
    assert forwarded_body(provider) == body


async def test_body_over_configured_limit_rejected(
    small_limit: GatewayWithRegistry, http: aiohttp.ClientSession
) -> None:
    gateway, registry = small_limit

    answer = await post_chat(http, gateway, pubkey=new_key(), body=padded_body(65537))

    assert answer.status == 413
    assert answer.json()["error"]["code"] == "request_too_large"
    assert registry.lookups == 0


async def test_chunked_body_over_configured_limit_memory_bounded(
    small_limit: GatewayWithRegistry,
) -> None:
    gateway, registry = small_limit

    tracemalloc.start()
    try:
        response, sent = await send_chunked_until_stopped(
            gateway.url, chat_head(new_key(), b"Transfer-Encoding: chunked"), max_bytes=40 * MIB
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert sent < 40 * MIB
    assert response is None or response.status == 413
    assert registry.lookups == 0
    # Bounded by the limit and aiohttp's read buffers, not by the 40 MiB sent.
    assert peak < 65536 + 1 * MIB, peak
