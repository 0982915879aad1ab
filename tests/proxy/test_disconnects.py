"""Connections that go away: clients that leave, and providers that close pooled connections."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import aiohttp
import orjson
import pytest
from gateway_harness import (
    MODEL,
    Admin,
    DemoStarter,
    GatewayStarter,
    SettingsFactory,
    chat_body,
    chat_events,
    post_chat,
    sample,
)
from relay_harness import RawAction, RawProvider, logged_faults

from proxy.demo.provider import DemoConfig
from proxy.server import RunningGateway

COMPLETIONS = "/v1/chat/completions"

UNAVAILABLE_BODY = (
    b'{"error":{"message":"The model is currently unavailable. Please try again later.",'
    b'"type":"bad_gateway","param":null,"code":null}}'
)

# How soon the provider must see its connection closed after the client left.
UPSTREAM_CLOSE_S = 1.0


async def in_flight_after(admin: Admin, *, timeout_s: float = 1.0) -> float:
    """Return the in-flight gauge once it reads 0, or its last value after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = sample(await admin.metrics(), "e2ee_gateway_requests_in_flight")
        if value == 0 or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


def access_records(caplog: pytest.LogCaptureFixture, path: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "proxy.access" and getattr(record, "path", None) == path
    ]


# Client goes away.


async def test_client_leaving_stream_closes_upstream(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    demo = await start_demo(DemoConfig(model=MODEL, events=100, event_delay_s=0.2))
    key = demo.config.keys.public_key_hex("ed25519")
    await admin.register(key, demo.url)

    received = b""
    async with http.post(
        gateway.url + COMPLETIONS,
        data=orjson.dumps(chat_body()),
        headers={"X-Model-Pub-Key": key},
    ) as response:
        while received.count(b"\n\n") < 2:
            received += await response.content.readany()
        response.close()
    left_at = time.monotonic()
    async with asyncio.timeout(UPSTREAM_CLOSE_S):
        await demo.state.client_gone.wait()
    upstream_closed_after = time.monotonic() - left_at

    records = access_records(caplog, COMPLETIONS)
    assert response.status == 200
    assert upstream_closed_after < UPSTREAM_CLOSE_S
    assert demo.state.completed == 0
    assert await in_flight_after(admin) == 0
    assert [getattr(record, "outcome", None) for record in records] == ["client_disconnect"]
    assert records[0].levelno == logging.INFO
    assert logged_faults(caplog.records) == []


async def test_client_leaving_before_headers_closes_upstream(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    demo = await start_demo(DemoConfig(model=MODEL, headers_delay_s=30.0))
    key = demo.config.keys.public_key_hex("ed25519")
    await admin.register(key, demo.url)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await post_chat(http, gateway, pubkey=key)
    left_at = time.monotonic()
    async with asyncio.timeout(UPSTREAM_CLOSE_S):
        await demo.state.client_gone.wait()
    upstream_closed_after = time.monotonic() - left_at

    records = access_records(caplog, COMPLETIONS)
    assert upstream_closed_after < UPSTREAM_CLOSE_S
    assert demo.state.requests[COMPLETIONS] == 1
    assert await in_flight_after(admin) == 0
    assert [getattr(record, "outcome", None) for record in records] == ["client_disconnect"]
    assert records[0].levelno == logging.INFO
    assert logged_faults(caplog.records) == []


# Pooled connection already closed by the provider.


async def test_provider_closing_idle_connections_never_fails_requests(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
) -> None:
    # The provider closes idle connections after 0.2 s while the gateway keeps them
    # longer, and the gaps straddle 0.2 s: some reuses race the provider's close.
    gateway = await start_gateway_with(make_settings(upstream_keepalive_s=4.0))
    admin = Admin(http, gateway.admin_url)
    demo = await start_demo(DemoConfig(model=MODEL, close_idle_after_s=0.2))
    key = demo.config.keys.public_key_hex("ed25519")
    await admin.register(key, demo.url)
    gaps = random.Random(8).uniform

    statuses = []
    for _ in range(50):
        statuses.append((await post_chat(http, gateway, pubkey=key)).status)
        await asyncio.sleep(gaps(0.18, 0.26))

    assert statuses == [200] * 50
    # More connections than one: the provider did close idle ones under the gateway.
    assert len(demo.state.peers) > 1


def ok_reply() -> bytes:
    body = b"".join(chat_events(2))
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + body


@pytest.mark.parametrize("first", ["close", "reset"])
async def test_connection_lost_before_response_retried_free(
    gateway: RunningGateway,
    admin: Admin,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    first: RawAction,
) -> None:
    caplog.set_level(logging.INFO)
    key = "ab" * 32
    async with RawProvider(ok_reply(), keep_alive=True) as provider:
        await admin.register(key, provider.url)
        # The first request leaves its connection in the pool. The second one reuses it,
        # and the provider closes it instead of responding.
        warm = await post_chat(http, gateway, pubkey=key)
        provider.then(first)
        answer = await post_chat(http, gateway, pubkey=key)
        metrics = await admin.metrics()

    records = access_records(caplog, COMPLETIONS)
    assert warm.status == 200
    assert answer.status == 200
    assert answer.body == b"".join(chat_events(2))
    assert len(provider.requests) == 3
    assert provider.connections == 2
    assert [getattr(record, "attempts", None) for record in records] == [1, 1]
    assert sample(metrics, "e2ee_gateway_upstream_retries_total", reason="stale_connection") == 1


@pytest.mark.parametrize("first", ["close", "reset"])
async def test_new_connection_lost_before_response_is_attempt(
    gateway: RunningGateway,
    admin: Admin,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    first: RawAction,
) -> None:
    caplog.set_level(logging.INFO)
    key = "ab" * 32
    async with RawProvider(ok_reply()) as provider:
        provider.then(first)
        await admin.register(key, provider.url)
        answer = await post_chat(http, gateway, pubkey=key)

    records = access_records(caplog, COMPLETIONS)
    assert answer.status == 200
    assert answer.body == b"".join(chat_events(2))
    assert provider.connections == 2
    assert [getattr(record, "attempts", None) for record in records] == [2]


async def test_provider_resetting_every_connection_gets_502(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    demo = await start_demo(DemoConfig(model=MODEL))
    key = demo.config.keys.public_key_hex("ed25519")
    await admin.register(key, demo.url)
    # A served request leaves a pooled connection, which the next request reuses.
    warm = await post_chat(http, gateway, pubkey=key)
    demo.config.reset_before_headers = True

    answer = await post_chat(http, gateway, pubkey=key)

    records = access_records(caplog, COMPLETIONS)
    assert warm.status == 200
    assert answer.status == 502
    assert answer.body == UNAVAILABLE_BODY
    # Three attempts, plus the one free retry for the pooled connection.
    assert demo.state.requests[COMPLETIONS] == 1 + 4
    assert [getattr(record, "attempts", None) for record in records] == [1, 3]
