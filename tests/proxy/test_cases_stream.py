"""Streams relayed as written, upstream errors before the first byte, and resets mid-stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import orjson
import pytest
from gateway_harness import (
    MODEL,
    Admin,
    DemoStarter,
    FakeStarter,
    Fetched,
    Reply,
    ScriptedProvider,
    chat_body,
    chat_events,
    closed_port_url,
    fetch,
    new_key,
    post_chat,
    sample,
)

from proxy.demo.provider import DemoConfig, DemoServer
from proxy.server import RunningGateway

# Copied from the product contract; clients match these bytes exactly.
UNAVAILABLE_BODY = (
    b'{"error":{"message":"The model is currently unavailable. Please try again later.",'
    b'"type":"bad_gateway","param":null,"code":null}}'
)

COMPLETIONS = "/v1/chat/completions"


@asynccontextmanager
async def busy(
    provider: ScriptedProvider, pubkey: str, http: aiohttp.ClientSession, gateway: RunningGateway
) -> AsyncIterator[None]:
    """Keep one pinned request in flight on ``provider``, so unpinned balancing prefers others."""
    release = asyncio.Event()
    provider.then(Reply(hold=release))
    task = asyncio.create_task(post_chat(http, gateway, pubkey=pubkey), name="busy-request")
    try:
        await provider.wait_for_requests(provider.requests + 1)
        yield
    finally:
        release.set()
        busy_response = await task
    assert busy_response.status == 200


async def direct_post(http: aiohttp.ClientSession, demo: DemoServer) -> Fetched:
    return await fetch(http, "POST", demo.url + COMPLETIONS, data=orjson.dumps(chat_body()))


# Stream arrives spread out, not in one burst.


async def test_stream_events_arrive_as_written(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    events = chat_events(19)
    fake = await start_fake(Reply(chunks=tuple(events), delay_s=0.1))
    key = new_key()
    await admin.register(key, fake.url)

    arrivals: list[float] = []
    received = b""
    async with http.post(
        gateway.url + COMPLETIONS,
        data=orjson.dumps(chat_body()),
        headers={"X-Model-Pub-Key": key, "Accept-Encoding": "gzip, br"},
    ) as response:
        async for chunk in response.content.iter_any():
            now = time.monotonic()
            received += chunk
            arrivals.extend([now] * (received.count(b"\n\n") - len(arrivals)))

    written = fake.served[0].write_times
    lags = [arrived - sent for arrived, sent in zip(arrivals, written, strict=True)]
    assert response.status == 200
    assert received == b"".join(events)
    assert len(arrivals) == 20
    assert lags[0] < 0.05
    # Each event reaches the client before the provider writes the next one.
    assert max(lags) < 0.09
    assert arrivals[-1] - arrivals[0] >= 1.7
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers
    assert "Content-Encoding" not in response.headers


# Upstream error before the first byte.


@pytest.mark.parametrize(
    ("status", "retry_after"), [(400, None), (429, 7), (503, None)], ids=["400", "429", "503"]
)
async def test_upstream_error_status_relayed_verbatim(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
    status: int,
    retry_after: int | None,
) -> None:
    demo = await start_demo(DemoConfig(model=MODEL, status=status, retry_after=retry_after))
    key = demo.config.keys.public_key_hex("ed25519")
    await admin.register(key, demo.url)

    direct = await direct_post(http, demo)
    answer = await post_chat(http, gateway, pubkey=key)

    assert answer.status == status
    assert answer.body == direct.body
    assert answer.headers["Content-Type"] == direct.headers["Content-Type"]
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.headers.get("Retry-After") == direct.headers.get("Retry-After")
    assert direct.headers.get("Retry-After") == (None if retry_after is None else "7")
    # Not retried: the gateway's request was one request to the provider.
    assert demo.state.requests[COMPLETIONS] == 2


async def test_upstream_500_pinned_gets_exact_502(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter, http: aiohttp.ClientSession
) -> None:
    demo = await start_demo(DemoConfig(model=MODEL, status=500))
    key = demo.config.keys.public_key_hex("ed25519")
    await admin.register(key, demo.url)

    answer = await post_chat(http, gateway, pubkey=key)

    assert answer.status == 502
    assert answer.body == UNAVAILABLE_BODY
    assert answer.headers["Content-Type"] == "application/json"
    assert demo.state.requests[COMPLETIONS] == 3


async def test_upstream_500_unpinned_served_by_other(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    failing = await start_demo(DemoConfig(model=MODEL, status=500))
    healthy = await start_fake()
    healthy_key = new_key()
    await admin.register(failing.config.keys.public_key_hex("ed25519"), failing.url)
    await admin.register(healthy_key, healthy.url)

    async with busy(healthy, healthy_key, http, gateway):
        answer = await post_chat(http, gateway)

    assert answer.status == 200
    assert answer.body == b"".join(healthy.default.chunks)
    assert failing.state.requests[COMPLETIONS] == 1


async def test_closed_port_pinned_gets_exact_502(
    gateway: RunningGateway, admin: Admin, http: aiohttp.ClientSession
) -> None:
    key = new_key()
    await admin.register(key, closed_port_url())

    answer = await post_chat(http, gateway, pubkey=key)

    assert answer.status == 502
    assert answer.body == UNAVAILABLE_BODY


async def test_closed_port_unpinned_served_by_other(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    healthy = await start_fake()
    healthy_key = new_key()
    await admin.register(new_key(), closed_port_url())
    await admin.register(healthy_key, healthy.url)

    async with busy(healthy, healthy_key, http, gateway):
        answer = await post_chat(http, gateway)

    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    assert answer.body == b"".join(healthy.default.chunks)
    assert healthy.requests == 2


async def test_client_errors_keep_provider_eligible(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    rejecting = await start_demo(DemoConfig(model=MODEL, status=400, fail_next=20))
    rejecting_key = rejecting.config.keys.public_key_hex("ed25519")
    other = await start_fake()
    other_key = new_key()
    await admin.register(rejecting_key, rejecting.url)
    await admin.register(other_key, other.url)

    statuses = [(await post_chat(http, gateway, pubkey=rejecting_key)).status for _ in range(20)]
    async with busy(other, other_key, http, gateway):
        unpinned = await post_chat(http, gateway)
    pinned = await post_chat(http, gateway, pubkey=rejecting_key)

    assert statuses == [400] * 20
    assert unpinned.status == 200
    # The unpinned request went to the provider that had returned 400 twenty times.
    assert rejecting.state.requests[COMPLETIONS] == 22
    assert other.requests == 1
    assert pinned.status == 200


async def test_server_errors_eject_provider(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    failing = await start_demo(DemoConfig(model=MODEL, status=500, fail_next=3))
    failing_key = failing.config.keys.public_key_hex("ed25519")
    other = await start_fake()
    other_key = new_key()
    await admin.register(failing_key, failing.url)
    await admin.register(other_key, other.url)

    pinned = await post_chat(http, gateway, pubkey=failing_key)
    async with busy(other, other_key, http, gateway):
        unpinned = await post_chat(http, gateway)

    assert pinned.status == 502
    assert unpinned.status == 200
    # Ejected: the busier provider got the request.
    assert failing.state.requests[COMPLETIONS] == 3
    assert other.requests == 2


async def test_error_first_event_pinned_gets_its_status(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter, http: aiohttp.ClientSession
) -> None:
    demo = await start_demo(DemoConfig(model=MODEL, error_first_event=True))
    key = demo.config.keys.public_key_hex("ed25519")
    await admin.register(key, demo.url)

    direct = await direct_post(http, demo)
    answer = await post_chat(http, gateway, pubkey=key)

    event_json = direct.body.removeprefix(b"data: ").removesuffix(b"\n\n")
    assert direct.status == 200
    assert orjson.loads(event_json)["error"]["code"] == 503
    assert answer.status == 503
    assert answer.body == event_json
    assert answer.headers["Content-Type"] == "application/json"


async def test_error_first_event_unpinned_served_by_other(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    overloaded = await start_demo(DemoConfig(model=MODEL, error_first_event=True))
    healthy = await start_fake()
    healthy_key = new_key()
    await admin.register(overloaded.config.keys.public_key_hex("ed25519"), overloaded.url)
    await admin.register(healthy_key, healthy.url)

    async with busy(healthy, healthy_key, http, gateway):
        answer = await post_chat(http, gateway)

    assert answer.status == 200
    assert answer.body == b"".join(healthy.default.chunks)
    assert overloaded.state.requests[COMPLETIONS] == 1


# Upstream dies after partial output.


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
async def test_reset_mid_stream_ends_with_error_frame(
    gateway: RunningGateway,
    admin: Admin,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
    pinned: bool,
) -> None:
    three_events = tuple(chat_events(3)[:3])
    dying = await start_fake(Reply(chunks=three_events, end="reset"))
    other = await start_fake()
    dying_key, other_key = new_key(), new_key()
    await admin.register(dying_key, dying.url)
    await admin.register(other_key, other.url)

    if pinned:
        answer = await post_chat(http, gateway, pubkey=dying_key)
    else:
        async with busy(other, other_key, http, gateway):
            answer = await post_chat(http, gateway)

    prefix = b"".join(three_events)
    frame = answer.body.removeprefix(prefix)
    error = orjson.loads(frame.removeprefix(b"data: ").removesuffix(b"\n\n"))["error"]
    assert answer.status == 200
    assert answer.body.startswith(prefix)
    assert frame.startswith(b"data: {")
    assert frame.endswith(b"}\n\n")
    assert list(error) == ["message", "type", "param", "code"]
    assert error["type"] == "server_error"
    assert error["param"] is None
    assert error["code"] == "upstream_reset"
    assert b"[DONE]" not in answer.body
    assert dying.requests == 1
    # Only the request that kept it busy reached the other provider.
    assert other.requests == (0 if pinned else 1)


async def test_reset_mid_stream_counted_in_metrics(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    dying = await start_fake(Reply(chunks=tuple(chat_events(3)[:3]), end="reset"))
    key = new_key()
    await admin.register(key, dying.url)
    before = await admin.metrics()

    answer = await post_chat(http, gateway, pubkey=key)
    after = await admin.metrics()

    assert answer.status == 200
    assert sample(before, "e2ee_gateway_stream_failures_total", code="upstream_reset") == 0
    assert sample(after, "e2ee_gateway_stream_failures_total", code="upstream_reset") == 1
    requests = sample(
        after,
        "e2ee_gateway_requests_total",
        route="chat_completions",
        status="200",
        outcome="upstream_reset",
    )
    assert requests == 1
