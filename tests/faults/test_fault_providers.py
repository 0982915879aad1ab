"""Providers that die, stall, reset, speak garbage or stop inside an event.

Each test injects one fault into every request of a few concurrent rounds (scaled by
``FAULTS_SCALE``) and checks what the clients see against the error contract: the exact
502 body, 504 ``upstream_timeout``, or a 200 stream that ends with one error event and
no ``data: [DONE]``. No request outlives its timeouts, nothing is logged with a
traceback, and afterwards descriptors, asyncio tasks and the gateway's connections to
the faulty provider are back at their baseline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from fault_harness import (
    FAULTS_SCALE,
    UNAVAILABLE_BODY,
    StreamResult,
    Usage,
    assert_settled,
    error_code,
    read_stream,
    start_demo_process,
)
from gateway_harness import (
    Admin,
    FakeStarter,
    GatewayStarter,
    Reply,
    ScriptedProvider,
    SettingsFactory,
    chat_events,
    new_key,
    sse,
)
from relay_harness import RawAction, RawProvider, logged_faults

from proxy.server import RunningGateway

CONCURRENT = 4 * FAULTS_SCALE
ROUNDS = 2 * FAULTS_SCALE
FIRST_BYTE_S = 0.5
IDLE_S = 0.5
REQUEST_S = 0.5
# A request may take its timeout plus this much scheduling slack.
SLACK_S = 1.5

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Connection: close\r\n\r\n"
)
SSE_CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
FIRST_EVENT = sse({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "a"}}]})


@pytest.fixture
async def faulty_gateway(
    make_settings: SettingsFactory, start_gateway_with: GatewayStarter
) -> RunningGateway:
    return await start_gateway_with(
        make_settings(
            first_byte_timeout_s=FIRST_BYTE_S,
            idle_timeout_s=IDLE_S,
            request_timeout_s=REQUEST_S,
            connect_timeout_s=0.5,
        )
    )


async def warm_up(
    gateway: RunningGateway,
    client: aiohttp.ClientSession,
    admin: Admin,
    provider: ScriptedProvider,
) -> None:
    """Send one request through a healthy provider, so lazily made state exists."""
    key = new_key()
    await admin.register(key, provider.url)
    result = await read_stream(client, gateway.url, pubkey=key, timeout_s=5)
    assert result.done


async def rounds(
    request: Callable[[], Awaitable[StreamResult]],
    check: Callable[[StreamResult], None],
) -> int:
    """Run ROUNDS rounds of CONCURRENT requests and check each; return how many ran."""
    count = 0
    for _ in range(ROUNDS):
        results = await asyncio.gather(*(request() for _ in range(CONCURRENT)))
        for result in results:
            check(result)
        count += len(results)
    return count


def assert_exact_502(result: StreamResult) -> None:
    assert result.status == 502, result
    assert result.content_type == "application/json"
    assert result.body == UNAVAILABLE_BODY


def assert_504(result: StreamResult, timeout_s: float) -> None:
    assert result.status == 504, result
    assert b'"type":"gateway_timeout"' in result.body
    assert b'"code":"upstream_timeout"' in result.body
    assert timeout_s <= result.duration_s < timeout_s + SLACK_S


def assert_error_frame(result: StreamResult, codes: set[str]) -> None:
    """Check a stream that started, then ended with one error event and no [DONE]."""
    assert result.status == 200, result
    assert result.content_type == "text/event-stream"
    assert not result.done, result.events
    assert error_code(result.events[-1]) in codes, result.events[-1]
    assert [e for e in result.events if error_code(e) is not None] == [result.events[-1]]


# A provider process killed mid-stream.


async def test_provider_killed_mid_stream_ends_with_error_frame(
    faulty_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    start_fake: FakeStarter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = Admin(client, faulty_gateway.admin_url)
    await warm_up(faulty_gateway, client, admin, await start_fake())
    baseline = Usage.measure()
    dead_ports: list[int] = []

    for _ in range(FAULTS_SCALE):
        demo = await start_demo_process("--events", "400", "--event-delay-s", "0.02")
        dead_ports.append(demo.port)
        await admin.register(demo.pubkey, demo.url)
        started = [asyncio.Event() for _ in range(CONCURRENT)]
        streams = [
            asyncio.create_task(
                read_stream(
                    client,
                    faulty_gateway.url,
                    pubkey=demo.pubkey,
                    timeout_s=10,
                    started=event,
                    min_events=3,
                )
            )
            for event in started
        ]

        async with asyncio.timeout(10):
            for event in started:
                await event.wait()
        demo.kill()
        await demo.wait()
        results = await asyncio.gather(*streams)
        after_kill = await read_stream(
            client, faulty_gateway.url, pubkey=demo.pubkey, timeout_s=5
        )

        for result in results:
            assert_error_frame(result, {"upstream_reset", "upstream_incomplete"})
            assert len(result.events) >= 4
        assert_exact_502(after_kill)

    await assert_settled(baseline, dead_ports)
    assert logged_faults(caplog.records) == []


# Providers that stall.


async def test_provider_stalling_before_headers_gets_504(
    faulty_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    start_fake: FakeStarter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = Admin(client, faulty_gateway.admin_url)
    await warm_up(faulty_gateway, client, admin, await start_fake())
    baseline = Usage.measure()

    async with RawProvider("hang") as provider:
        key = new_key()
        await admin.register(key, provider.url)
        port = int(provider.url.rsplit(":", 1)[1])

        streamed = await rounds(
            lambda: read_stream(client, faulty_gateway.url, pubkey=key, timeout_s=5),
            lambda result: assert_504(result, FIRST_BYTE_S),
        )
        whole = await rounds(
            lambda: read_stream(
                client, faulty_gateway.url, pubkey=key, stream=False, timeout_s=5
            ),
            lambda result: assert_504(result, REQUEST_S),
        )

    # A timeout is never retried: one connection per request, each closed by the gateway.
    assert provider.connections == streamed + whole
    assert provider.closed_by_peer == streamed + whole
    await assert_settled(baseline, [port])
    assert logged_faults(caplog.records) == []


async def test_provider_stalling_mid_stream_ends_with_idle_frame(
    faulty_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    start_fake: FakeStarter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = Admin(client, faulty_gateway.admin_url)
    await warm_up(faulty_gateway, client, admin, await start_fake())
    stalling = await start_fake(Reply(chunks=tuple(chat_events(3)), delay_s=30))
    key = new_key()
    await admin.register(key, stalling.url)
    port = int(stalling.url.rsplit(":", 1)[1])
    baseline = Usage.measure([port])

    def check(result: StreamResult) -> None:
        assert_error_frame(result, {"upstream_idle_timeout"})
        assert IDLE_S <= result.duration_s < IDLE_S + SLACK_S

    await rounds(lambda: read_stream(client, faulty_gateway.url, pubkey=key, timeout_s=5), check)

    await assert_settled(baseline, [port])
    assert logged_faults(caplog.records) == []


# Providers that reset, send garbage or stop inside an event.


RAW_FAULTS: dict[str, tuple[RawAction, str]] = {
    "reset-before-headers": ("reset", "502"),
    "close-before-headers": ("close", "502"),
    "garbage": ((b"GARBAGE\r\n\r\n",), "502"),
    "tls-bytes": ((b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",), "502"),
    "bad-status": ((b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",), "502"),
    "header-without-colon": ((b"HTTP/1.1 200 OK\r\nBroken header\r\n\r\n",), "502"),
    "half-first-event": ((SSE_HEAD + b'data: {"id":"chatcmpl-1",',), "502"),
    "half-later-event": ((SSE_HEAD + FIRST_EVENT + b'data: {"id":"chatcmpl-1",',), "incomplete"),
    "chunked-cut-after-event": (
        (SSE_CHUNKED_HEAD + b"%x\r\n" % len(FIRST_EVENT) + FIRST_EVENT + b"\r\n",),
        "reset",
    ),
    "chunked-cut-inside-chunk": (
        (SSE_CHUNKED_HEAD + b"%x\r\n" % (len(FIRST_EVENT) + 50) + FIRST_EVENT,),
        "reset",
    ),
}


@pytest.mark.parametrize("fault", list(RAW_FAULTS))
async def test_raw_provider_fault_answered_per_contract(
    faulty_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    start_fake: FakeStarter,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    action, expected = RAW_FAULTS[fault]
    admin = Admin(client, faulty_gateway.admin_url)
    await warm_up(faulty_gateway, client, admin, await start_fake())
    baseline = Usage.measure()

    def check(result: StreamResult) -> None:
        match expected:
            case "502":
                assert_exact_502(result)
            case "incomplete":
                assert_error_frame(result, {"upstream_incomplete"})
            case _:
                assert_error_frame(result, {"upstream_reset"})
        assert result.duration_s < SLACK_S

    async with RawProvider(action) as provider:
        key = new_key()
        await admin.register(key, provider.url)
        port = int(provider.url.rsplit(":", 1)[1])

        await rounds(
            lambda: read_stream(client, faulty_gateway.url, pubkey=key, timeout_s=5), check
        )

    await assert_settled(baseline, [port])
    assert logged_faults(caplog.records) == []


async def test_provider_resetting_mid_stream_ends_with_reset_frame(
    faulty_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    start_fake: FakeStarter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = Admin(client, faulty_gateway.admin_url)
    await warm_up(faulty_gateway, client, admin, await start_fake())
    resetting = await start_fake(Reply(chunks=tuple(chat_events(3)[:2]), end="reset"))
    key = new_key()
    await admin.register(key, resetting.url)
    port = int(resetting.url.rsplit(":", 1)[1])
    baseline = Usage.measure([port])

    def check(result: StreamResult) -> None:
        assert_error_frame(result, {"upstream_reset"})
        assert len(result.events) == 3

    await rounds(lambda: read_stream(client, faulty_gateway.url, pubkey=key, timeout_s=5), check)

    await assert_settled(baseline, [port])
    assert logged_faults(caplog.records) == []
