"""A provider that never responds must not slow the others down or leak sockets and tasks."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable

import aiohttp
import orjson
from gateway_harness import (
    Admin,
    GatewayStarter,
    SettingsFactory,
    chat_body,
    chat_events,
    new_key,
)
from relay_harness import RawProvider

from proxy.server import RunningGateway

COMPLETIONS = "/v1/chat/completions"
CONCURRENCY = 200
FIRST_BYTE_S = 1.0
# Margin over the baseline for descriptors that close a moment after the last check.
FD_MARGIN = 10


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(measure: Callable[[], int], target: int, timeout_s: float = 3.0) -> int:
    """Return ``measure()`` once it is at most ``target``, or its value after ``timeout_s``."""
    for _ in range(round(timeout_s / 0.05)):
        if (value := measure()) <= target:
            return value
        await asyncio.sleep(0.05)
    return measure()


async def timed_stream(
    client: aiohttp.ClientSession, gateway: RunningGateway, key: str
) -> tuple[int, float, bytes]:
    """Send one pinned stream request; return its status, latency and body."""
    started = time.monotonic()
    async with client.post(
        gateway.url + COMPLETIONS,
        data=orjson.dumps(chat_body()),
        headers={"X-Model-Pub-Key": key},
    ) as response:
        body = await response.read()
    return response.status, time.monotonic() - started, body


async def test_hung_provider_leaves_others_unaffected(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_gateway_with(make_settings(first_byte_timeout_s=FIRST_BYTE_S))
    admin = Admin(http, gateway.admin_url)
    events = tuple(chat_events(4))
    # Streams of about 0.5 s, and a connection per request: no pooled connection
    # hides the cost of connecting.
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    hung_key, healthy_key = new_key(), new_key()

    async with RawProvider("hang") as hung, RawProvider((head, *events), pause_s=0.1) as healthy:
        await admin.register(hung_key, hung.url)
        await admin.register(healthy_key, healthy.url)
        # Measure the baseline after everything that lives through the test has started.
        client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        baseline_fds = open_fds()
        baseline_tasks = asyncio.all_tasks()

        # The healthy provider alone, then with as many requests stuck on the hung one.
        try:
            alone = await asyncio.gather(
                *(timed_stream(client, gateway, healthy_key) for _ in range(CONCURRENCY))
            )
            mixed = await asyncio.gather(
                *(timed_stream(client, gateway, healthy_key) for _ in range(CONCURRENCY)),
                *(timed_stream(client, gateway, hung_key) for _ in range(CONCURRENCY)),
            )
        finally:
            await client.close()

        fds_after = await settle(open_fds, baseline_fds + FD_MARGIN)
        leftover = await settle(
            lambda: len(asyncio.all_tasks() - baseline_tasks - {asyncio.current_task()}), 0
        )
        closed_by_gateway = hung.closed_by_peer

    healthy_mixed, hung_mixed = mixed[:CONCURRENCY], mixed[CONCURRENCY:]
    median_alone = statistics.median(latency for _, latency, _ in alone)
    median_mixed = statistics.median(latency for _, latency, _ in healthy_mixed)
    assert [status for status, _, _ in alone] == [200] * CONCURRENCY
    assert [status for status, _, _ in healthy_mixed] == [200] * CONCURRENCY
    assert all(body == b"".join(events) for _, _, body in healthy_mixed)
    assert [status for status, _, _ in hung_mixed] == [504] * CONCURRENCY
    assert median_mixed < 2 * median_alone + 0.2, (median_alone, median_mixed)
    assert hung.connections == CONCURRENCY
    assert closed_by_gateway == CONCURRENCY
    assert fds_after <= baseline_fds + FD_MARGIN, (baseline_fds, fds_after)
    assert leftover == 0
