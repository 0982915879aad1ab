"""Graceful shutdown: readiness flip, the drain delay, the grace period and the signals.

In-process tests drive ``RunningGateway.drain_and_stop()``; the subprocess tests send
real signals to ``python -m proxy`` and check its exit code.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import aiohttp
import orjson
from gateway_harness import (
    Admin,
    FakeStarter,
    GatewayProcess,
    GatewayStarter,
    Reply,
    SettingsFactory,
    chat_body,
    chat_events,
    fetch,
    new_key,
    poll_until,
    wait_listening,
)
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.server import RunningGateway

DONE = b"data: [DONE]\n\n"
SHUTTING_DOWN_BODY = (
    b'{"error":{"message":"This gateway is shutting down. Retry the request; it will reach '
    b'another replica.","type":"service_unavailable","param":null,"code":"shutting_down"}}'
)


async def stream(http: aiohttp.ClientSession, url: str, key: str) -> tuple[int, bytes]:
    """POST a pinned streamed chat completion and return its status and whole body."""
    async with http.post(
        url + "/v1/chat/completions",
        data=orjson.dumps(chat_body()),
        headers={"X-Model-Pub-Key": key},
    ) as response:
        return response.status, await response.read()


async def readiness(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/readyz") as response:
        return response.status


async def draining(http: aiohttp.ClientSession, url: str) -> bool:
    return await readiness(http, url) == 503


async def started(gateway: RunningGateway, streams: int) -> None:
    """Wait until ``streams`` streams are being relayed by the gateway."""
    await poll_until(lambda: gateway.gateway.forwarder.streams_in_flight >= streams)


def local_samples(gateway: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Read the gateway's metrics in process: its admin listener is closed after the delay."""
    text = generate_latest(gateway.gateway.metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_drain_flips_readiness_then_finishes_streams(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_gateway_with(make_settings(drain_delay_s=0.5, shutdown_grace_s=5.0))
    provider = await start_fake(Reply(chunks=tuple(chat_events(10)), delay_s=0.1))
    key = new_key()
    await Admin(http, gateway.admin_url).register(key, provider.url)
    streams = [asyncio.create_task(stream(http, gateway.url, key)) for _ in range(3)]
    await started(gateway, 3)

    drain = asyncio.create_task(gateway.drain_and_stop())
    await asyncio.sleep(0)
    draining_gauge = local_samples(gateway)[("e2ee_gateway_draining", ())]
    ready = await readiness(http, gateway.url)
    healthy = await fetch(http, "GET", gateway.url + "/healthz")
    during_delay = await stream(http, gateway.url, key)
    await drain
    results = await asyncio.gather(*streams)

    assert ready == 503
    assert draining_gauge == 1
    assert healthy.status == 200
    assert during_delay == (200, b"".join(chat_events(10)))
    for status, body in results:
        assert status == 200
        assert body.endswith(DONE)
    assert gateway.gateway.requests_in_flight == 0
    assert local_samples(gateway)[("e2ee_gateway_requests_in_flight", ())] == 0


async def test_drain_closes_listener_after_delay(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_gateway_with(make_settings(drain_delay_s=0.2, shutdown_grace_s=5.0))

    began = time.monotonic()
    await gateway.drain_and_stop()
    elapsed = time.monotonic() - began

    assert 0.2 <= elapsed < 1.0
    try:
        await fetch(http, "GET", gateway.url + "/healthz")
    except aiohttp.ClientConnectionError:
        refused = True
    else:
        refused = False
    assert refused


async def test_request_racing_close_gets_503_shutting_down(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter
) -> None:
    # Step 3 of the drain sets refusing_requests and then closes the connections. A
    # request read in between gets the same response as this one on an open connection.
    provider = await start_fake()
    key = new_key()
    await admin.register(key, provider.url)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as client:
        first = await stream(client, gateway.url, key)
        gateway.gateway.refusing_requests = True
        async with client.post(
            gateway.url + "/v1/chat/completions",
            data=orjson.dumps(chat_body()),
            headers={"X-Model-Pub-Key": key},
        ) as response:
            refused = (response.status, dict(response.headers), await response.read())
        gateway.gateway.refusing_requests = False

    status, headers, body = refused
    assert first[0] == 200
    assert status == 503
    assert body == SHUTTING_DOWN_BODY
    assert headers["Retry-After"] == "1"
    assert headers["Connection"] == "close"
    assert provider.requests == 1


async def test_response_after_delay_says_connection_close(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_gateway_with(make_settings(drain_delay_s=0.2, shutdown_grace_s=5.0))
    hold = asyncio.Event()
    provider = await start_fake(Reply(hold=hold))
    key = new_key()
    await Admin(http, gateway.admin_url).register(key, provider.url)

    async def held_stream() -> tuple[int, str | None, bytes]:
        async with http.post(
            gateway.url + "/v1/chat/completions",
            data=orjson.dumps(chat_body()),
            headers={"X-Model-Pub-Key": key},
        ) as response:
            return response.status, response.headers.get("Connection"), await response.read()

    # The provider sends its headers only after the drain delay, so the gateway prepares
    # the client's response while it rejects new requests.
    pending = asyncio.create_task(held_stream())
    await provider.wait_for_requests(1)
    drain = asyncio.create_task(gateway.drain_and_stop())
    await poll_until(lambda: gateway.gateway.refusing_requests)
    hold.set()
    status, connection, body = await pending
    await drain

    assert status == 200
    assert connection == "close"
    assert body.endswith(DONE)


async def test_grace_deadline_ends_stream_with_error_event(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_gateway_with(make_settings(drain_delay_s=0.1, shutdown_grace_s=0.4))
    provider = await start_fake(Reply(chunks=tuple(chat_events(40)), delay_s=0.1))
    key = new_key()
    await Admin(http, gateway.admin_url).register(key, provider.url)
    pending = asyncio.create_task(stream(http, gateway.url, key))
    await started(gateway, 1)

    began = time.monotonic()
    await gateway.drain_and_stop()
    elapsed = time.monotonic() - began
    status, body = await pending
    samples = local_samples(gateway)

    assert status == 200
    assert not body.endswith(DONE)
    last_event = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last_event.startswith(b"data: ")
    error = orjson.loads(last_event.removeprefix(b"data: "))["error"]
    assert error["code"] == "shutting_down"
    assert error["type"] == "server_error"
    assert elapsed < 2.0
    failures = ("e2ee_gateway_stream_failures_total", (("code", "shutting_down"),))
    assert samples[failures] == 1
    requests = (
        "e2ee_gateway_requests_total",
        (("outcome", "shutting_down"), ("route", "chat_completions"), ("status", "200")),
    )
    assert samples[requests] == 1
    assert samples[("e2ee_gateway_streams_in_flight", ())] == 0


async def test_sigterm_drains_and_exits_zero(
    spawn: Callable[..., GatewayProcess], start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    process = spawn(GATEWAY_DRAIN_DELAY_S="0.5", GATEWAY_SHUTDOWN_GRACE_S="10")
    await wait_listening(process)
    provider = await start_fake(Reply(chunks=tuple(chat_events(15)), delay_s=0.1))
    key = new_key()
    await Admin(http, process.admin_url).register(key, provider.url)
    pending = asyncio.create_task(stream(http, process.url, key))
    await provider.wait_for_requests(1)

    process.send_signal(signal.SIGTERM)
    await poll_until(lambda: draining(http, process.url), timeout_s=2)
    status, body = await pending
    code = await process.wait_exit(10)
    log = process.log()

    assert status == 200
    assert body.endswith(DONE)
    assert code == 0
    assert "received SIGTERM" in log
    assert "all 1 request(s) in flight finished" in log
    assert log.rstrip().endswith("stopped")


async def test_second_signal_stops_at_once(
    spawn: Callable[..., GatewayProcess], start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    process = spawn(GATEWAY_DRAIN_DELAY_S="30", GATEWAY_SHUTDOWN_GRACE_S="30")
    await wait_listening(process)
    provider = await start_fake(Reply(chunks=tuple(chat_events(300)), delay_s=0.1))
    key = new_key()
    await Admin(http, process.admin_url).register(key, provider.url)
    pending = asyncio.create_task(stream(http, process.url, key))
    await provider.wait_for_requests(1)

    process.send_signal(signal.SIGTERM)
    await poll_until(lambda: draining(http, process.url), timeout_s=2)
    began = time.monotonic()
    process.send_signal(signal.SIGINT)
    code = await process.wait_exit(5)
    elapsed = time.monotonic() - began
    try:
        _, body = await pending
    except aiohttp.ClientPayloadError:
        body = b""

    assert code == 0
    assert elapsed < 3.0
    assert not body.endswith(DONE)
    assert "received a second signal: stopping at once" in process.log()
