"""First-byte, idle and total timeouts are separate, and none caps a stream that keeps going."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
from gateway_harness import (
    MODEL,
    Admin,
    DemoStarter,
    FakeStarter,
    Fetched,
    GatewayStarter,
    Reply,
    SettingsFactory,
    chat_body,
    new_key,
    post_chat,
)

from proxy.demo.provider import DemoConfig, DemoServer
from proxy.server import RunningGateway

COMPLETIONS = "/v1/chat/completions"
FIRST_BYTE_S = 0.5
IDLE_S = 0.5
REQUEST_S = 1.5
# Timers fire late under load, so the margins allow lateness only: firing early is a fault.
LATE_MARGIN_S = 0.7


@pytest.fixture
async def gateway(
    start_gateway_with: GatewayStarter, make_settings: SettingsFactory
) -> RunningGateway:
    """A gateway with timeouts scaled down to fractions of a second."""
    return await start_gateway_with(
        make_settings(
            first_byte_timeout_s=FIRST_BYTE_S,
            idle_timeout_s=IDLE_S,
            request_timeout_s=REQUEST_S,
        )
    )


async def register_demo(admin: Admin, start_demo: DemoStarter, **config: Any) -> DemoServer:
    demo = await start_demo(DemoConfig(model=MODEL, **config))
    await admin.register(demo.config.keys.public_key_hex("ed25519"), demo.url)
    return demo


async def timed_post(
    http: aiohttp.ClientSession, gateway: RunningGateway, key: str, *, stream: bool
) -> tuple[Fetched, float]:
    started = time.monotonic()
    answer = await post_chat(http, gateway, pubkey=key, body=chat_body(stream=stream))
    return answer, time.monotonic() - started


def assert_timeout_envelope(answer: Fetched) -> None:
    error = answer.json()["error"]
    assert answer.status == 504
    assert answer.headers["Content-Type"] == "application/json"
    assert list(error) == ["message", "type", "param", "code"]
    assert error["type"] == "gateway_timeout"
    assert error["param"] is None
    assert error["code"] == "upstream_timeout"


def split_events(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event]


# First byte.


async def test_no_headers_gets_504_at_first_byte_timeout(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter, http: aiohttp.ClientSession
) -> None:
    demo = await register_demo(admin, start_demo, headers_delay_s=30.0)
    key = demo.config.keys.public_key_hex("ed25519")

    answer, elapsed = await timed_post(http, gateway, key, stream=True)
    async with asyncio.timeout(1.0):
        await demo.state.client_gone.wait()

    assert_timeout_envelope(answer)
    assert FIRST_BYTE_S <= elapsed < FIRST_BYTE_S + LATE_MARGIN_S
    # A first-byte timeout is never retried.
    assert demo.state.requests[COMPLETIONS] == 1


async def test_headers_without_event_get_504(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    # Headers and a comment arrive at once; the first data event never does.
    fake = await start_fake(Reply(chunks=(b": waiting\n\n", b"data: late\n\n"), delay_s=30.0))
    key = new_key()
    await admin.register(key, fake.url)

    answer, elapsed = await timed_post(http, gateway, key, stream=True)

    assert_timeout_envelope(answer)
    assert FIRST_BYTE_S <= elapsed < FIRST_BYTE_S + LATE_MARGIN_S
    assert fake.requests == 1


# Idle gap between reads.


async def test_silence_after_event_ends_with_idle_frame(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter, http: aiohttp.ClientSession
) -> None:
    demo = await register_demo(admin, start_demo, events=3, event_delay_s=30.0)
    key = demo.config.keys.public_key_hex("ed25519")

    answer, elapsed = await timed_post(http, gateway, key, stream=True)
    async with asyncio.timeout(1.0):
        await demo.state.client_gone.wait()

    events = split_events(answer.body)
    error = orjson.loads(events[-1].removeprefix(b"data: "))["error"]
    assert answer.status == 200
    assert len(events) == 2
    assert orjson.loads(events[0].removeprefix(b"data: "))["object"] == "chat.completion.chunk"
    assert answer.body.endswith(b"\n\n")
    assert error["type"] == "server_error"
    assert error["code"] == "upstream_idle_timeout"
    assert b"[DONE]" not in answer.body
    assert IDLE_S <= elapsed < IDLE_S + LATE_MARGIN_S


async def test_slow_steady_stream_completes(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter, http: aiohttp.ClientSession
) -> None:
    # Each gap is under the idle timeout and the whole stream lasts six times the
    # first-byte timeout: no total cap applies to a stream.
    demo = await register_demo(admin, start_demo, events=10, event_delay_s=0.3)
    key = demo.config.keys.public_key_hex("ed25519")

    answer, elapsed = await timed_post(http, gateway, key, stream=True)

    assert answer.status == 200
    assert answer.body.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in answer.body
    assert elapsed > 3.0
    assert demo.state.completed == 1


# Total time of a request that is not a stream.


async def test_slow_json_within_request_timeout_succeeds(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter, http: aiohttp.ClientSession
) -> None:
    demo = await register_demo(admin, start_demo, headers_delay_s=2 * FIRST_BYTE_S)
    key = demo.config.keys.public_key_hex("ed25519")

    answer, elapsed = await timed_post(http, gateway, key, stream=False)

    assert answer.status == 200
    assert answer.json()["object"] == "chat.completion"
    assert elapsed >= 2 * FIRST_BYTE_S


async def test_json_over_request_timeout_gets_504(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter, http: aiohttp.ClientSession
) -> None:
    demo = await register_demo(admin, start_demo, headers_delay_s=30.0)
    key = demo.config.keys.public_key_hex("ed25519")

    answer, elapsed = await timed_post(http, gateway, key, stream=False)
    async with asyncio.timeout(1.0):
        await demo.state.client_gone.wait()

    assert_timeout_envelope(answer)
    assert REQUEST_S <= elapsed < REQUEST_S + LATE_MARGIN_S
    assert demo.state.requests[COMPLETIONS] == 1


async def test_json_body_trickling_past_request_timeout_gets_504(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    # Headers come at once and the body keeps arriving: the total timeout still ends it.
    pieces = tuple(b'{"id":"chatcmpl-1","pad":"' if i == 0 else b"x" for i in range(20))
    fake = await start_fake(
        Reply(headers=(("Content-Type", "application/json"),), chunks=pieces, delay_s=0.2)
    )
    key = new_key()
    await admin.register(key, fake.url)

    answer, elapsed = await timed_post(http, gateway, key, stream=False)

    assert_timeout_envelope(answer)
    assert REQUEST_S <= elapsed < REQUEST_S + LATE_MARGIN_S
    assert fake.requests == 1
