"""Prometheus metrics on the admin listener: what each kind of request moves, and bounds.

Every test reads ``/metrics`` over HTTP and parses it with prometheus_client's parser.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
from gateway_harness import (
    MODEL,
    Admin,
    FakeClock,
    FakeStarter,
    Reply,
    SettingsFactory,
    chat_body,
    chat_events,
    closed_port_url,
    new_key,
    poll_until,
    post_chat,
    sample,
)
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import RegistryStatsCollector
from proxy.server import RunningGateway, start_gateway
from registry import MemoryRegistry

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

REQUESTS = "e2ee_gateway_requests_total"


@pytest.fixture
async def gateway(
    make_settings: SettingsFactory, clock: FakeClock
) -> AsyncIterator[RunningGateway]:
    """A gateway whose provider gauges refresh every 50 ms, so tests need not wait long."""
    registry = MemoryRegistry(clock)
    running = await start_gateway(
        make_settings(), registry=registry, provider_gauges_interval_s=0.05
    )
    yield running
    await running.stop()
    await registry.aclose()


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


async def wait_for_sample(admin: Admin, name: str, value: float, **labels: str) -> Samples:
    """Poll /metrics until the sample has ``value``; return the samples read last."""
    samples: Samples = {}

    async def reached() -> bool:
        nonlocal samples
        samples = await admin.metrics()
        return sample(samples, name, **labels) == value

    await poll_until(reached)
    return samples


async def test_scripted_run_moves_counters(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    healthy = await start_fake()
    resetting = await start_fake(Reply(chunks=tuple(chat_events(3)[:3]), end="reset"))
    good_key, dead_key, reset_key = new_key(), new_key(), new_key()
    await admin.register(good_key, healthy.url)
    await admin.register(dead_key, closed_port_url())
    await admin.register(reset_key, resetting.url)
    await wait_for_sample(admin, "e2ee_gateway_live_keys", 3, model=MODEL)
    before = await admin.metrics()

    ok = await post_chat(http, gateway, pubkey=good_key)
    stale = await post_chat(http, gateway, pubkey=new_key())
    unreachable = await post_chat(http, gateway, pubkey=dead_key)
    unknown = await post_chat(http, gateway, body=chat_body(model="no-such-model"))
    reset = await post_chat(http, gateway, pubkey=reset_key)
    after = await admin.metrics()

    assert [ok.status, stale.status, unreachable.status, unknown.status, reset.status] == [
        200,
        421,
        502,
        404,
        200,
    ]
    route = "chat_completions"
    assert delta(before, after, REQUESTS, route=route, status="200", outcome="ok") == 1
    assert delta(before, after, REQUESTS, route=route, status="421", outcome="stale_pubkey") == 1
    assert (
        delta(before, after, REQUESTS, route=route, status="502", outcome="provider_unreachable")
        == 1
    )
    assert delta(before, after, REQUESTS, route=route, status="404", outcome="model_not_found") == 1
    assert delta(before, after, REQUESTS, route=route, status="200", outcome="upstream_reset") == 1
    attempts = "e2ee_gateway_upstream_attempts_total"
    assert delta(before, after, attempts, result="ok") == 2
    assert delta(before, after, attempts, result="connect_error") == 3
    retries = "e2ee_gateway_upstream_retries_total"
    assert delta(before, after, retries, reason="connect_error") == 2
    failures = "e2ee_gateway_stream_failures_total"
    assert delta(before, after, failures, code="upstream_reset") == 1
    assert delta(before, after, "e2ee_gateway_time_to_first_byte_seconds_count") == 2
    assert delta(before, after, "e2ee_gateway_stream_duration_seconds_count") == 2
    by_model = "e2ee_gateway_model_requests_total"
    assert delta(before, after, by_model, model=MODEL, outcome="ok") == 1
    assert delta(before, after, by_model, model=MODEL, outcome="stale_pubkey") == 1
    assert delta(before, after, by_model, model="other", outcome="model_not_found") == 1
    assert sample(after, "e2ee_gateway_requests_in_flight") == 0
    assert sample(after, "e2ee_gateway_streams_in_flight") == 0


async def test_in_flight_gauges_return_to_zero_after_disconnect(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    provider = await start_fake(Reply(chunks=tuple(chat_events(100)), delay_s=0.05))
    key = new_key()
    await admin.register(key, provider.url)
    before = await admin.metrics()

    async def read_until_cancelled() -> None:
        async with http.post(
            gateway.url + "/v1/chat/completions",
            data=orjson.dumps(chat_body()),
            headers={"X-Model-Pub-Key": key},
        ) as response:
            await response.read()

    client = asyncio.create_task(read_until_cancelled())
    during = await wait_for_sample(admin, "e2ee_gateway_streams_in_flight", 1)
    client.cancel()
    after = await wait_for_sample(admin, "e2ee_gateway_streams_in_flight", 0)
    after = await wait_for_sample(admin, "e2ee_gateway_requests_in_flight", 0)

    assert sample(during, "e2ee_gateway_requests_in_flight") == 1
    assert sample(before, "e2ee_gateway_requests_in_flight") == 0
    # 499, as nginx logs it: the client left before the response ended.
    outcome = {"route": "chat_completions", "status": "499", "outcome": "client_disconnect"}
    assert delta(before, after, REQUESTS, **outcome) == 1


async def test_provider_gauges_follow_registry(
    gateway: RunningGateway, admin: Admin, clock: FakeClock
) -> None:
    shared = new_key()
    await admin.register(shared, "http://127.0.0.1:1001", ttl_s=10)
    await admin.register(shared, "http://127.0.0.1:1002", ttl_s=10)
    await admin.register(new_key(), "http://127.0.0.1:1003", ttl_s=10)
    await admin.register(new_key(), "http://127.0.0.1:1004", model="second-model", ttl_s=10)

    live = await wait_for_sample(admin, "e2ee_gateway_live_providers", 3, model=MODEL)
    clock.advance(11)
    gone = await wait_for_sample(admin, "e2ee_gateway_live_providers", 0, model=MODEL)

    assert sample(live, "e2ee_gateway_live_keys", model=MODEL) == 2
    assert sample(live, "e2ee_gateway_live_keys", model="second-model") == 1
    assert sample(live, "e2ee_gateway_live_providers", model="second-model") == 1
    assert ("e2ee_gateway_live_keys", (("model", MODEL),)) not in gone
    assert ("e2ee_gateway_live_keys", (("model", "second-model"),)) not in gone


async def test_random_models_and_keys_add_no_label_values(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    provider = await start_fake()
    key = new_key()
    await admin.register(key, provider.url)
    await wait_for_sample(admin, "e2ee_gateway_live_keys", 1, model=MODEL)

    async def one_random(index: int) -> int:
        model = f"flood-{secrets.token_hex(8)}"
        pinned = new_key() if index % 2 else None
        answer = await post_chat(http, gateway, pubkey=pinned, body=chat_body(model=model))
        return answer.status

    # A first round creates the label values that every later round reuses.
    assert {await one_random(0), await one_random(1)} == {404, 421}
    known = set(await admin.metrics())
    statuses: list[int] = []
    for start in range(0, 500, 50):
        statuses += await asyncio.gather(*(one_random(i) for i in range(start, start + 50)))
    after = await admin.metrics()

    assert set(statuses) == {404, 421}
    assert set(after) == known
    models = {dict(labels).get("model") for _, labels in after} - {None}
    assert models == {MODEL, "other"}
    assert sample(after, "e2ee_gateway_model_requests_total", model="other", outcome="stale_pubkey")
    assert sample(after, "e2ee_gateway_requests_in_flight") == 0


@dataclass(slots=True)
class ExampleStats:
    lookups_snapshot: int = 0
    lookups_redis: int = 0
    redis_errors: int = 0
    note: str = "ignored"


def test_stats_collector_exports_counters() -> None:
    stats = ExampleStats(lookups_snapshot=7, lookups_redis=2, redis_errors=1)
    registry = CollectorRegistry()
    registry.register(RegistryStatsCollector(lambda: stats))

    text = generate_latest(registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    assert sample(samples, "e2ee_gateway_registry_lookups_total", source="snapshot") == 7
    assert sample(samples, "e2ee_gateway_registry_lookups_total", source="redis") == 2
    assert sample(samples, "e2ee_gateway_registry_redis_errors_total") == 1
    assert not any("note" in name for name, _ in samples)


def test_stats_collector_without_stats_exports_nothing() -> None:
    registry = CollectorRegistry()
    registry.register(RegistryStatsCollector(lambda: None))

    assert generate_latest(registry) == b""
