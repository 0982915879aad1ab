"""A gateway on its own redis-server while that server freezes, dies and comes back.

Each test starts a private redis-server (never the shared one) and a gateway on it with
a 0.2 s Redis timeout. Freezing uses SIGSTOP, so connections stay open and nothing
responds, the hardest outage to notice. While Redis cannot answer, a pinned key that
this replica has not seen gets 503 ``registry_unavailable``, never 421: a client that
got 421 would throw a valid key away. Keys in the snapshot are served for the outage
grace, and every request is answered within its timeouts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from fault_harness import (
    FAULTS_SCALE,
    STALE_KEY_BODY,
    StreamResult,
    Usage,
    assert_settled,
    read_stream,
)
from gateway_harness import (
    MODEL,
    Admin,
    FakeStarter,
    Fetched,
    GatewayStarter,
    SettingsFactory,
    fetch,
    new_key,
)
from redis_processes import RedisProcess, redis_processes, start_redis
from relay_harness import logged_faults

from proxy.server import RunningGateway

pytestmark = pytest.mark.redis_server

REDIS_TIMEOUT_S = 0.2
GRACE_S = 1.5
# Any request during an outage gets its response within the Redis timeout plus this slack.
ANSWER_BOUND_S = REDIS_TIMEOUT_S + 1.0
RECOVERY_DEADLINE_S = 8.0
CONCURRENT = 8 * FAULTS_SCALE


@pytest.fixture
def processes() -> Iterator[list[RedisProcess]]:
    with redis_processes() as started:
        yield started


@pytest.fixture
def redis(tmp_path: Path, processes: list[RedisProcess]) -> RedisProcess:
    server = start_redis(tmp_path / "redis")
    processes.append(server)
    return server


@pytest.fixture
async def redis_gateway(
    redis: RedisProcess, make_settings: SettingsFactory, start_gateway_with: GatewayStarter
) -> RunningGateway:
    return await start_gateway_with(
        make_settings(
            registry_url=redis.url,
            redis_timeout_s=REDIS_TIMEOUT_S,
            registry_outage_grace_s=GRACE_S,
        )
    )


async def timed(call: Awaitable[Fetched]) -> tuple[Fetched, float]:
    started = time.monotonic()
    async with asyncio.timeout(ANSWER_BOUND_S + 5):
        answer = await call
    return answer, time.monotonic() - started


def pinned(client: aiohttp.ClientSession, gateway: RunningGateway, key: str) -> Awaitable[Fetched]:
    body = orjson.dumps({"model": MODEL, "stream": True})
    return fetch(
        client,
        "POST",
        gateway.url + "/v1/chat/completions",
        data=body,
        headers={"X-Model-Pub-Key": key},
    )


def assert_registry_unavailable(answer: Fetched, duration_s: float) -> None:
    assert answer.status == 503, answer.body
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json()["error"]["code"] == "registry_unavailable"
    assert answer.headers["Retry-After"] == "2"
    assert duration_s < ANSWER_BOUND_S


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while not await check():
        assert time.monotonic() < deadline, "the gateway did not recover in time"
        await asyncio.sleep(0.1)


async def served(client: aiohttp.ClientSession, gateway: RunningGateway, key: str) -> StreamResult:
    return await read_stream(client, gateway.url, pubkey=key, timeout_s=5)


# Frozen Redis.


async def test_frozen_redis_answers_503_never_421(
    redis: RedisProcess,
    redis_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    start_fake: FakeStarter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = Admin(client, redis_gateway.admin_url)
    provider = await start_fake()
    known = new_key()
    await admin.register(known, provider.url)
    assert (await served(client, redis_gateway, known)).done
    baseline = Usage.measure()

    redis.freeze()
    unknown = await asyncio.gather(
        *(timed(pinned(client, redis_gateway, new_key())) for _ in range(CONCURRENT))
    )
    unpinned, unpinned_s = await timed(
        fetch(
            client,
            "POST",
            redis_gateway.url + "/v1/chat/completions",
            data=orjson.dumps({"model": "model-never-seen"}),
        )
    )
    heartbeat = await timed(
        admin.heartbeat(
            {"pubkey": new_key(), "model": MODEL, "url": provider.url, "signing_algo": "ed25519"}
        )
    )
    during = await served(client, redis_gateway, known)

    for answer, duration_s in unknown:
        assert_registry_unavailable(answer, duration_s)
    assert_registry_unavailable(unpinned, unpinned_s)
    assert_registry_unavailable(*heartbeat)
    assert during.done

    redis.thaw()
    stale = new_key()

    async def stale_key_refused() -> bool:
        answer = await pinned(client, redis_gateway, stale)
        return answer.status == 421

    await eventually(stale_key_refused)
    assert (await pinned(client, redis_gateway, stale)).body == STALE_KEY_BODY
    assert (await served(client, redis_gateway, known)).done
    await assert_settled(baseline, [])
    assert logged_faults(caplog.records) == []


async def test_frozen_redis_past_grace_gets_503(
    redis: RedisProcess,
    redis_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    start_fake: FakeStarter,
) -> None:
    admin = Admin(client, redis_gateway.admin_url)
    provider = await start_fake()
    known = new_key()
    await admin.register(known, provider.url)
    assert (await served(client, redis_gateway, known)).done

    redis.freeze()
    # The outage starts with the first request that Redis leaves unanswered.
    first, _ = await timed(pinned(client, redis_gateway, new_key()))
    await asyncio.sleep(GRACE_S + 0.1)
    late, late_s = await timed(pinned(client, redis_gateway, known))
    redis.thaw()

    assert first.status == 503
    assert_registry_unavailable(late, late_s)


async def test_readyz_ready_within_outage_grace(
    redis: RedisProcess,
    redis_gateway: RunningGateway,
    client: aiohttp.ClientSession,
) -> None:
    url = redis_gateway.url + "/readyz"
    assert (await fetch(client, "GET", url)).status == 200

    redis.freeze()
    await timed(pinned(client, redis_gateway, new_key()))
    within, within_s = await timed(fetch(client, "GET", url))
    await asyncio.sleep(GRACE_S + 0.1)
    after, after_s = await timed(fetch(client, "GET", url))
    redis.thaw()

    assert within.status == 200
    assert within_s < ANSWER_BOUND_S
    assert after.status == 503
    assert after_s < ANSWER_BOUND_S


# Redis killed and restarted empty.


async def test_restarted_redis_recovers_without_hanging(
    tmp_path: Path,
    redis: RedisProcess,
    processes: list[RedisProcess],
    redis_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    start_fake: FakeStarter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = Admin(client, redis_gateway.admin_url)
    provider = await start_fake()
    known = new_key()
    await admin.register(known, provider.url)
    assert (await served(client, redis_gateway, known)).done
    baseline = Usage.measure()

    for _ in range(FAULTS_SCALE):
        redis.kill()
        unknown, unknown_s = await timed(pinned(client, redis_gateway, new_key()))
        during = await served(client, redis_gateway, known)
        assert_registry_unavailable(unknown, unknown_s)
        assert during.done

        # The new server has no data: until the provider's next heartbeat, its key is
        # unknown to a reachable registry, which is a 421.
        redis = start_redis(tmp_path / "redis", port=redis.port)
        processes.append(redis)

        async def key_refused() -> bool:
            answer = await pinned(client, redis_gateway, known)
            assert answer.status in (200, 421, 503), answer.body
            return answer.status == 421

        await eventually(key_refused)
        await admin.register(known, provider.url)
        assert (await served(client, redis_gateway, known)).done

    await assert_settled(baseline, [])
    assert logged_faults(caplog.records) == []
