"""SnapshotRegistry on the session's redis-server: propagation, cost per lookup, coalescing.

Timings and command counts are printed (run with ``-s`` to see them). Timing asserts use
bounds far looser than the printed values, so that a loaded machine does not fail them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio

from registry import (
    Endpoint,
    Heartbeat,
    HeartbeatOutcome,
    HeartbeatResult,
    ProviderEntry,
    RedisRegistry,
    RegistryUnavailable,
    SnapshotRegistry,
    open_registry,
)
from registry.snapshot_state import RegistryClock, SnapshotState

pytestmark = pytest.mark.redis_server

KEY_A = "a7" * 32
KEY_B = "b8" * 32
URL_1 = "http://192.0.2.1:8000"
URL_2 = "http://192.0.2.2:8000"
PROPAGATION_DEADLINE_S = 1.0
DATA_COMMANDS = ("hget", "hmget", "hgetall", "time", "evalsha", "eval", "get")

Opener = Callable[..., Awaitable[SnapshotRegistry]]


def beat(pubkey: str = KEY_A, url: str = URL_1, *, ttl_s: float = 60.0) -> Heartbeat:
    return Heartbeat(pubkey, "llama", url, "ed25519", "alice", ttl_s, "inst-1")


def random_key() -> str:
    return secrets.token_hex(32)


@pytest.fixture
async def open_snapshot(redis_url: str) -> AsyncIterator[Opener]:
    """Return an opener of started SnapshotRegistry replicas, closed after the test."""
    opened: list[SnapshotRegistry] = []

    async def open_one(**options: Any) -> SnapshotRegistry:
        inner = RedisRegistry.from_url(redis_url, timeout_s=1.0)
        registry = SnapshotRegistry(inner, timeout_s=1.0, **options)
        opened.append(registry)
        await registry.start()
        # start() loads once, and the first subscription loads again: wait for both, so
        # that no background HGETALL lands inside a measurement.
        await wait_for(lambda: registry.stats.resyncs >= 2, 2.0)
        return registry

    yield open_one
    for registry in opened:
        await registry.aclose()


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def command_calls(admin: redis.asyncio.Redis) -> dict[str, int]:
    """Return the server's call count per command, from INFO commandstats."""
    stats = await admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Return the data commands run between two INFO readings (INFO and PING left out)."""
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in DATA_COMMANDS}
    return {name: count for name, count in delta.items() if count}


async def wait_for(condition: Callable[[], bool], deadline_s: float) -> float:
    """Return the seconds until ``condition()`` held; fail after ``deadline_s``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < deadline_s, "condition not met before the deadline"
        await asyncio.sleep(0.0005)
    return time.monotonic() - started


async def test_heartbeat_reaches_other_replica(open_snapshot: Opener) -> None:
    writer = await open_snapshot()
    reader = await open_snapshot()
    assert reader.peek(KEY_A) is None

    await writer.heartbeat(beat())
    delay_s = await wait_for(lambda: reader.peek(KEY_A) is not None, PROPAGATION_DEADLINE_S)

    print(f"\nheartbeat propagation to another replica: {delay_s * 1000:.2f} ms")
    assert delay_s < PROPAGATION_DEADLINE_S
    assert writer.peek(KEY_A) is not None
    assert reader.stats.events_applied >= 1
    assert reader.stats.read_throughs == 0


async def test_deregister_reaches_other_replica(open_snapshot: Opener) -> None:
    writer = await open_snapshot()
    reader = await open_snapshot()
    await writer.heartbeat(beat(url=URL_1))
    await writer.heartbeat(beat(url=URL_2))
    await wait_for(lambda: len(getattr(reader.peek(KEY_A), "endpoints", ())) == 2, 1.0)

    removed = await writer.deregister(KEY_A, url=URL_1, identity="alice")
    delay_s = await wait_for(
        lambda: [e.url for e in getattr(reader.peek(KEY_A), "endpoints", ())] == [URL_2],
        PROPAGATION_DEADLINE_S,
    )
    await writer.deregister(KEY_A, url=None, identity=None)
    gone_s = await wait_for(lambda: reader.peek(KEY_A) is None, PROPAGATION_DEADLINE_S)

    print(f"\nderegister propagation: {delay_s * 1000:.2f} ms, eviction {gone_s * 1000:.2f} ms")
    assert removed == [URL_1]
    assert writer.peek(KEY_A) is None
    assert await reader.get(KEY_A) is None


async def test_lease_ends_at_expires_at_without_event(open_snapshot: Opener) -> None:
    writer = await open_snapshot()
    reader = await open_snapshot()
    result = await writer.heartbeat(beat(ttl_s=0.3))
    await wait_for(lambda: reader.peek(KEY_A) is not None, PROPAGATION_DEADLINE_S)
    events_before = reader.stats.events_applied

    while await reader.now() <= result.expires_at:
        assert reader.peek(KEY_A) is not None
        await asyncio.sleep(0.005)
    late_s = await reader.now() - result.expires_at

    assert reader.peek(KEY_A) is None
    assert await reader.get(KEY_A) is None
    assert reader.stats.events_applied == events_before
    assert late_s < 0.1


async def test_missing_key_read_from_redis(
    open_snapshot: Opener, admin: redis.asyncio.Redis
) -> None:
    reader = await open_snapshot()
    now_s, _ = await admin.time()
    # Written without the script, so no event announces it: the snapshot lacks the key.
    endpoint = {"owner": "alice", "instance_id": "", "registered_at": now_s}
    endpoint |= {"last_heartbeat": now_s, "expires_at": now_s + 60}
    value = {"model": "llama", "signing_algo": "ed25519", "endpoints": {URL_1: endpoint}}
    await admin.hset("e2ee:providers", KEY_B, orjson.dumps(value).decode())

    assert reader.peek(KEY_B) is None
    entry = await reader.get(KEY_B)

    assert entry is not None
    assert [e.url for e in entry.endpoints] == [URL_1]
    assert reader.peek(KEY_B) == entry
    assert reader.stats.lookups_redis == 1


async def test_snapshot_hits_send_no_command(
    open_snapshot: Opener, admin: redis.asyncio.Redis, redis_url: str
) -> None:
    # A plain writer: a second snapshot would re-read its own events during the count.
    writer = open_registry(redis_url, snapshot=False)
    reader = await open_snapshot()
    await writer.heartbeat(beat())
    await writer.aclose()
    await wait_for(lambda: reader.peek(KEY_A) is not None, PROPAGATION_DEADLINE_S)

    before = await command_calls(admin)
    started = time.perf_counter()
    for _ in range(1000):
        entry = await reader.get(KEY_A)
    hit_us = (time.perf_counter() - started) * 1000
    after_hits = await command_calls(admin)

    unknown = [random_key() for _ in range(1000)]
    started = time.perf_counter()
    for key in unknown:
        assert await reader.get(key) is None
    miss_us = (time.perf_counter() - started) * 1000
    after_misses = await command_calls(admin)
    for key in unknown:
        assert await reader.get(key) is None
    after_negative = await command_calls(admin)

    hits = calls_delta(before, after_hits)
    misses = calls_delta(after_hits, after_misses)
    negative = calls_delta(after_misses, after_negative)
    print(
        f"\nper lookup: snapshot hit {hit_us:.2f} µs, read-through miss {miss_us:.1f} µs"
        f"\nRedis commands per 1,000 lookups: hits {sum(hits.values())} {hits}, "
        f"read-through misses {sum(misses.values())} {misses}, "
        f"cached misses {sum(negative.values())} {negative}"
    )
    assert entry is not None
    assert hits == {}
    assert misses == {"hget": 1000, "time": 1000}
    assert negative == {}
    assert reader.stats.negative_cache_hits == 1000


async def test_concurrent_misses_share_one_read(
    open_snapshot: Opener, admin: redis.asyncio.Redis
) -> None:
    reader = await open_snapshot()
    key = random_key()

    before = await command_calls(admin)
    answers = await asyncio.gather(*(reader.get(key) for _ in range(100)))
    after = await command_calls(admin)

    assert answers == [None] * 100
    assert calls_delta(before, after) == {"hget": 1, "time": 1}
    assert reader.stats.read_throughs == 1
    assert reader.stats.coalesced_waits == 99


async def test_unknown_key_flood_is_bounded(open_snapshot: Opener) -> None:
    reader = await open_snapshot(max_read_throughs=4)
    inner = reader.inner
    in_flight = 0
    peak = 0
    read_entry = inner.read_entry

    async def counting_read(pubkey: str) -> tuple[float, ProviderEntry | None]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await read_entry(pubkey)
        finally:
            in_flight -= 1

    inner.read_entry = counting_read  # type: ignore[method-assign]
    keys = [random_key() for _ in range(300)]

    answers = await asyncio.gather(*(reader.get(k) for k in keys), return_exceptions=True)

    # A lookup that waits longer than timeout_s for a slot is shed with
    # RegistryUnavailable; on a loaded machine a few may be.
    shed = [a for a in answers if isinstance(a, RegistryUnavailable)]
    print(f"\nflood of {len(keys)} unknown keys: peak concurrent reads {peak}, shed {len(shed)}")
    assert peak == 4
    assert answers.count(None) + len(shed) == len(keys)
    assert answers.count(None) > len(keys) // 2
    assert reader.stats.read_throughs == answers.count(None)


async def test_model_miss_reloads_once(open_snapshot: Opener, admin: redis.asyncio.Redis) -> None:
    reader = await open_snapshot(negative_ttl_s=5.0)
    await asyncio.sleep(0.05)
    resyncs = reader.stats.resyncs

    answers = await asyncio.gather(*(reader.by_model("no-such-model") for _ in range(50)))
    before = await command_calls(admin)
    again = await reader.by_model("another-model")
    after = await command_calls(admin)

    assert answers == [[]] * 50
    assert again == []
    assert reader.stats.resyncs <= resyncs + 1
    assert calls_delta(before, after) == {}


async def test_by_model_served_from_snapshot(
    open_snapshot: Opener, admin: redis.asyncio.Redis, redis_url: str
) -> None:
    writer = open_registry(redis_url, snapshot=False)
    reader = await open_snapshot()
    await writer.heartbeat(beat(KEY_A))
    await writer.heartbeat(beat(KEY_B))
    await writer.aclose()
    await wait_for(lambda: reader.peek(KEY_B) is not None, PROPAGATION_DEADLINE_S)

    before = await command_calls(admin)
    entries = await reader.by_model("llama")
    models = await reader.live_models()
    after = await command_calls(admin)

    assert [e.pubkey for e in entries] == [KEY_A, KEY_B]
    assert models == ["llama"]
    assert calls_delta(before, after) == {}


async def test_own_write_visible_at_once(open_snapshot: Opener) -> None:
    registry = await open_snapshot()

    result = await registry.heartbeat(beat())
    entry = registry.peek(KEY_A)

    assert entry is not None
    assert entry.endpoints[0].expires_at == result.expires_at


async def test_open_registry_defaults_to_snapshot(redis_url: str) -> None:
    registry = open_registry(redis_url)
    plain = open_registry(redis_url, snapshot=False)
    try:
        assert isinstance(registry, SnapshotRegistry)
        assert isinstance(plain, RedisRegistry)
        assert not registry.ready
        await registry.start()
        assert registry.ready
    finally:
        await registry.aclose()
        await plain.aclose()


async def test_closed_registry_raises_unavailable(open_snapshot: Opener) -> None:
    registry = await open_snapshot()
    await registry.heartbeat(beat())
    await registry.aclose()

    with pytest.raises(RegistryUnavailable):
        await registry.get(KEY_A)


async def test_cancelled_waiter_leaves_shared_read(open_snapshot: Opener) -> None:
    reader = await open_snapshot()
    key = random_key()
    waiters = [asyncio.create_task(reader.get(key), name="waiter") for _ in range(3)]
    await asyncio.sleep(0)

    waiters[0].cancel("the client left")
    answers = await asyncio.gather(*waiters[1:])

    assert waiters[0].cancelled()
    assert answers == [None, None]
    assert reader.stats.read_throughs == 1
    assert reader.stats.coalesced_waits == 2


# --- SnapshotState, without Redis ------------------------------------------------------


def entry(pubkey: str, *urls_and_expiry: tuple[str, float], model: str = "llama") -> ProviderEntry:
    endpoints = tuple(
        Endpoint(url, "alice", "inst-1", 0.0, expires_at - 60, expires_at)
        for url, expires_at in urls_and_expiry
    )
    return ProviderEntry(pubkey, model, "ed25519", endpoints)


def test_state_read_older_than_touch_not_installed() -> None:
    state = SnapshotState()
    read_seq = state.seq
    state.touch(KEY_A)

    installed = state.install(KEY_A, entry(KEY_A, (URL_1, 100.0)), read_seq)

    assert not installed
    assert state.stored(KEY_A) is None


def test_state_full_reload_keeps_touched_key() -> None:
    state = SnapshotState()
    state.install(KEY_A, entry(KEY_A, (URL_1, 100.0)), state.seq)
    state.install(KEY_B, entry(KEY_B, (URL_1, 100.0)), state.seq)
    read_seq = state.seq
    newer = entry(KEY_B, (URL_2, 200.0))
    state.touch(KEY_B)
    state.install(KEY_B, newer, state.seq)

    state.replace_all([entry(KEY_B, (URL_1, 100.0))], read_seq)

    assert state.stored(KEY_A) is None
    assert state.stored(KEY_B) == newer


def test_state_live_filters_by_time() -> None:
    state = SnapshotState()
    state.install(KEY_A, entry(KEY_A, (URL_1, 100.0), (URL_2, 200.0)), state.seq)

    at_150 = state.live(KEY_A, 150.0)

    assert at_150 is not None
    assert [e.url for e in at_150.endpoints] == [URL_2]
    assert state.live(KEY_A, 200.0) is None
    assert state.by_model("llama", 200.0) == []
    assert state.live_models(150.0) == ["llama"]


def test_state_model_index_follows_rebinding() -> None:
    state = SnapshotState()
    state.install(KEY_A, entry(KEY_A, (URL_1, 100.0), model="llama"), state.seq)

    state.install(KEY_A, entry(KEY_A, (URL_1, 100.0), model="qwen"), state.seq)

    assert state.by_model("llama", 0.0) == []
    assert [e.pubkey for e in state.by_model("qwen", 0.0)] == [KEY_A]


def test_state_negative_mark_expires_and_is_bounded() -> None:
    state = SnapshotState(max_negative=2)
    state.mark_negative("k1", 10.0)
    state.mark_negative("k2", 10.0)
    state.mark_negative("k3", 10.0)

    assert not state.negative("k1", 5.0)
    assert state.negative("k3", 5.0)
    assert not state.negative("k3", 10.0)


def test_state_touch_clears_negative_mark() -> None:
    state = SnapshotState()
    state.mark_negative(KEY_A, 10.0)

    state.touch(KEY_A)

    assert not state.negative(KEY_A, 5.0)


def test_state_own_heartbeat_keeps_other_endpoints() -> None:
    state = SnapshotState()
    state.install(KEY_A, entry(KEY_A, (URL_1, 100.0)), state.seq)
    result = HeartbeatResult(HeartbeatOutcome.REGISTERED, expires_at=150.0)

    state.apply_heartbeat(beat(KEY_A, URL_2, ttl_s=60.0), result)
    stored = state.stored(KEY_A)

    assert stored is not None
    assert [(e.url, e.expires_at) for e in stored.endpoints] == [(URL_1, 100.0), (URL_2, 150.0)]
    assert stored.endpoints[1].last_heartbeat == 90.0


def test_state_conflict_changes_nothing() -> None:
    state = SnapshotState()
    seq = state.seq

    state.apply_heartbeat(beat(), HeartbeatResult(HeartbeatOutcome.OWNER_CONFLICT))

    assert state.stored(KEY_A) is None
    assert state.seq == seq


def test_clock_estimate_runs_on_monotonic_time() -> None:
    clock = RegistryClock()

    assert clock.at(5.0) is None
    clock.sync(1_700_000_000.0, 5.0)
    assert clock.at(7.5) == 1_700_000_002.5


async def test_model_last_live_from_snapshot(
    open_snapshot: Opener, admin: redis.asyncio.Redis, redis_url: str
) -> None:
    writer = open_registry(redis_url, snapshot=False)
    try:
        first = await writer.heartbeat(beat(KEY_A, ttl_s=60.0))
        reader = await open_snapshot()
        loaded = await reader.model_last_live("llama")
        later = await writer.heartbeat(beat(KEY_B, ttl_s=60.0))
    finally:
        await writer.aclose()
    await wait_for(lambda: reader.peek(KEY_B) is not None, PROPAGATION_DEADLINE_S)

    before = await command_calls(admin)
    followed = await reader.model_last_live("llama")
    unknown = await reader.model_last_live("no-such-model")
    after = await command_calls(admin)

    assert loaded == pytest.approx(first.expires_at - 60.0, abs=0.002)
    assert followed == pytest.approx(later.expires_at - 60.0, abs=0.05)
    assert unknown is None
    assert calls_delta(before, after) == {}
