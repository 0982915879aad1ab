"""Memory after many rounds of mixed provider faults stays where the first rounds left it.

tracemalloc counts the bytes allocated after it starts and still alive, so it starts
once warm-up rounds have filled caches and pools. Then the same rounds run twice: a
leak of even one small object per failed request (an Exchange, a task, a buffered
first event) makes the second batch add as much as the first, while a flat gateway
adds almost nothing. Each batch is 336 requests at ``FAULTS_SCALE=1``, so the growth
bound catches a leak of about 150 bytes per request; the gap between batches measured
-15 to +26 KiB on a 2-core machine without any leak.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
import pytest
from fault_harness import FAULTS_SCALE, Usage, assert_settled, read_stream
from gateway_harness import (
    Admin,
    FakeStarter,
    GatewayStarter,
    Reply,
    SettingsFactory,
    chat_events,
    new_key,
)
from relay_harness import RawProvider, logged_faults

from proxy.server import RunningGateway

WARM_UP_ROUNDS = 2
MEASURED_ROUNDS = 3 * FAULTS_SCALE
CONCURRENT = 16
RETAINED_BOUND_BYTES = 512 * 1024
GROWTH_BOUND_BYTES = 48 * 1024

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


async def quiet_traced_memory(samples: int = 5) -> int:
    """Return the least traced memory over a few samples 50 ms apart.

    A sample can catch a transient buffer, such as a socket read in progress on a
    pooled connection; the least one is what the gateway keeps.
    """
    sizes = []
    for _ in range(samples):
        gc.collect()
        sizes.append(tracemalloc.get_traced_memory()[0])
        await asyncio.sleep(0.05)
    return min(sizes)


@pytest.fixture
async def raw_providers() -> AsyncIterator[list[RawProvider]]:
    actions = [
        RawProvider("reset"),
        RawProvider("hang"),
        RawProvider((b"GARBAGE\r\n\r\n",)),
        RawProvider((SSE_HEAD + b"data: {}\n\ndata: {",)),
    ]
    for provider in actions:
        await provider.__aenter__()
    yield actions
    for provider in actions:
        await provider.__aexit__(None, None, None)


async def test_repeated_faults_leave_memory_flat(
    make_settings: SettingsFactory,
    start_gateway_with: GatewayStarter,
    start_fake: FakeStarter,
    client: aiohttp.ClientSession,
    raw_providers: list[RawProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway: RunningGateway = await start_gateway_with(
        make_settings(
            first_byte_timeout_s=0.3,
            idle_timeout_s=0.3,
            request_timeout_s=0.3,
            # Idle pooled connections (and their buffers) close before each measurement.
            upstream_keepalive_s=0.2,
        )
    )
    admin = Admin(client, gateway.admin_url)
    healthy = await start_fake()
    stalling = await start_fake(Reply(chunks=tuple(chat_events(2)), delay_s=30))
    resetting = await start_fake(Reply(chunks=tuple(chat_events(2)[:1]), end="reset"))
    urls = [healthy.url, stalling.url, resetting.url, *(p.url for p in raw_providers)]
    keys = [new_key() for _ in urls]
    for key, url in zip(keys, urls, strict=True):
        await admin.register(key, url)

    async def mixed_round() -> None:
        await asyncio.gather(
            *(
                read_stream(client, gateway.url, pubkey=key, stream=stream, timeout_s=5)
                for key in keys
                for stream in (True, False)
                for _ in range(CONCURRENT // 2)
            )
        )
        # The test doubles record every request; only the gateway's memory is measured.
        for scripted in (healthy, stalling, resetting):
            scripted.served.clear()
        for raw in raw_providers:
            raw.requests.clear()

    ports = [int(url.rsplit(":", 1)[1]) for url in urls]
    for _ in range(WARM_UP_ROUNDS):
        await mixed_round()
    baseline = await assert_settled(Usage(fds=1 << 20, tasks=1 << 20, upstream=0), ports)
    # Pytest keeps every captured record until the test ends: below ERROR, none is made.
    caplog.set_level(logging.ERROR)
    caplog.clear()
    gc.collect()
    tracemalloc.start()
    try:
        retained = []
        for _ in range(2):
            for _ in range(MEASURED_ROUNDS):
                await mixed_round()
            await assert_settled(baseline, ports)
            retained.append(await quiet_traced_memory())
    finally:
        tracemalloc.stop()

    requests = MEASURED_ROUNDS * len(keys) * CONCURRENT
    print(f"\nbytes retained after {requests} and {2 * requests} requests: {retained}")
    assert retained[0] < RETAINED_BOUND_BYTES
    assert retained[1] - retained[0] < GROWTH_BOUND_BYTES
    assert logged_faults(caplog.records) == []
