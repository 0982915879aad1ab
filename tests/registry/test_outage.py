"""SnapshotRegistry when Redis freezes, restarts, drops the subscriber or replies slowly.

Each test runs its own redis-server (freezing the session's server would stall other
tests) with short timeouts: Redis timeout 0.3 s, outage grace 1 s, PING every 0.2 s.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
import pytest
import redis.asyncio
from redis_processes import RedisProcess, SlowRelay, free_port, redis_processes, start_redis

from registry import (
    Heartbeat,
    MemoryRegistry,
    ProviderEntry,
    RedisRegistry,
    Registry,
    RegistryUnavailable,
    SnapshotRegistry,
    open_registry,
)
from registry.redis_io import EventSubscription
from registry.snapshot_sync import SnapshotSync, _Backoff

pytestmark = pytest.mark.redis_server

T = TypeVar("T")

KEY_LONG = "c1" * 32
KEY_SHORT = "c2" * 32
KEY_UNKNOWN = "c3" * 32
KEY_ABSENT = "0e" * 32
URL_1 = "http://192.0.2.1:8000"
TIMEOUT_S = 0.3
GRACE_S = 1.0
# A call may take the Redis timeout plus scheduling slack, never a multiple of it.
CALL_BOUND_S = TIMEOUT_S + 0.25
RECOVERY_DEADLINE_S = 6.0


def beat(pubkey: str, *, ttl_s: float = 60.0, model: str = "llama", url: str = URL_1) -> Heartbeat:
    return Heartbeat(pubkey, model, url, "ed25519", "alice", ttl_s, "inst-1")


def snapshot_of(url: str, **options: Any) -> SnapshotRegistry:
    inner = RedisRegistry.from_url(url, timeout_s=TIMEOUT_S)
    settings: dict[str, Any] = {
        "outage_grace_s": GRACE_S,
        "timeout_s": TIMEOUT_S,
        "health_check_interval_s": 0.2,
        "max_backoff_s": 0.3,
    }
    return SnapshotRegistry(inner, **(settings | options))


@pytest.fixture
def processes() -> Iterator[list[RedisProcess]]:
    with redis_processes() as started:
        yield started


@pytest.fixture
async def closing() -> AsyncIterator[list[Registry]]:
    """A list of registries to close after the test, before its processes stop."""
    registries: list[Registry] = []
    yield registries
    for registry in registries:
        await registry.aclose()


async def timed(call: Awaitable[T]) -> tuple[float, T | BaseException]:
    """Await ``call``; return its duration and its result or exception."""
    started = time.monotonic()
    try:
        result: T | BaseException = await call
    except RegistryUnavailable as exc:
        result = exc
    return time.monotonic() - started, result


async def eventually(check: Callable[[], Awaitable[bool]], deadline_s: float) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < deadline_s, "not recovered before the deadline"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_frozen_redis_served_within_grace(
    tmp_path: Path, processes: list[RedisProcess], closing: list[Registry]
) -> None:
    server = start_redis(tmp_path)
    processes.append(server)
    registry = snapshot_of(server.url)
    closing.append(registry)
    await registry.start()
    await registry.heartbeat(beat(KEY_LONG))
    short = await registry.heartbeat(beat(KEY_SHORT, ttl_s=0.5))

    # 1. Freeze Redis: the first miss waits one timeout, then the outage is known.
    server.freeze()
    first_s, first = await timed(registry.get(KEY_UNKNOWN))
    again_s, again = await timed(registry.get("c4" * 32))
    known_s, known = await timed(registry.get(KEY_LONG))
    ready_in_grace = registry.ready

    assert isinstance(first, RegistryUnavailable)
    assert first_s < CALL_BOUND_S
    assert isinstance(again, RegistryUnavailable)
    assert again_s < 0.05
    assert isinstance(known, ProviderEntry)
    assert known_s < 0.05
    assert ready_in_grace

    # 2. Past its expires_at, a lease live when the outage began is still served.
    # Redis and this test share the machine's clock.
    await asyncio.sleep(max(0.0, short.expires_at + 0.05 - time.time()))
    stale = await registry.get(KEY_SHORT)
    by_model = await registry.by_model("llama")

    assert stale is not None
    assert [e.pubkey for e in by_model] == [KEY_LONG, KEY_SHORT]
    assert registry.stats.lookups_stale >= 2

    # 3. Past the grace, every lookup raises and readiness is lost.
    await asyncio.sleep(GRACE_S)
    late_s, late = await timed(registry.get(KEY_LONG))
    ready_after_grace = registry.ready

    assert isinstance(late, RegistryUnavailable)
    assert late_s < 0.05
    assert not ready_after_grace

    # 4. Redis replies again: the same registry recovers without a restart.
    server.thaw()
    recovery_s = await eventually(lambda: _live(registry, KEY_LONG), RECOVERY_DEADLINE_S)
    print(f"\nrecovered {recovery_s:.2f} s after SIGCONT")
    assert registry.ready
    assert await registry.get(KEY_SHORT) is None


async def _live(registry: Registry, pubkey: str) -> bool:
    try:
        return await registry.get(pubkey) is not None
    except RegistryUnavailable:
        return False


async def test_calls_bounded_while_frozen(
    tmp_path: Path, processes: list[RedisProcess], closing: list[Registry]
) -> None:
    server = start_redis(tmp_path)
    processes.append(server)
    registry = snapshot_of(server.url)
    closing.append(registry)
    await registry.start()
    await registry.heartbeat(beat(KEY_LONG))

    server.freeze()
    calls: list[Awaitable[Any]] = [
        registry.get(KEY_UNKNOWN),
        registry.by_model("other"),
        registry.heartbeat(beat(KEY_SHORT)),
        registry.model_last_live("llama"),
        registry.ping(),
        registry.entries(),
        registry.reap(),
    ]
    outcomes = [await timed(call) for call in calls]
    durations = [duration for duration, _ in outcomes]

    print(f"\ncall durations while frozen (s): {[round(d, 3) for d in durations]}")
    assert max(durations) < CALL_BOUND_S
    assert all(isinstance(result, RegistryUnavailable) for _, result in outcomes)


async def test_start_without_redis_recovers(
    tmp_path: Path, processes: list[RedisProcess], closing: list[Registry]
) -> None:
    port = free_port()
    registry = snapshot_of(f"redis://127.0.0.1:{port}/0")
    closing.append(registry)

    start_s, _ = await timed(registry.start())
    assert start_s < CALL_BOUND_S
    assert not registry.ready
    with pytest.raises(RegistryUnavailable):
        await registry.get(KEY_LONG)

    server = start_redis(tmp_path, port=port)
    processes.append(server)
    writer = open_registry(server.url, snapshot=False)
    closing.append(writer)
    await writer.heartbeat(beat(KEY_LONG))

    async def loaded() -> bool:
        return registry.ready and registry.peek(KEY_LONG) is not None

    await eventually(loaded, RECOVERY_DEADLINE_S)


async def test_restarted_redis_resynced(
    tmp_path: Path, processes: list[RedisProcess], closing: list[Registry]
) -> None:
    server = start_redis(tmp_path)
    processes.append(server)
    registry = snapshot_of(server.url)
    closing.append(registry)
    await registry.start()
    await registry.heartbeat(beat(KEY_LONG))
    resyncs = registry.stats.resyncs

    # A new, empty Redis on the same port, as after a restart without persistence.
    server.stop()
    restarted = start_redis(tmp_path, port=server.port)
    processes.append(restarted)

    async def emptied() -> bool:
        return registry.peek(KEY_LONG) is None and registry.stats.resyncs > resyncs

    await eventually(emptied, RECOVERY_DEADLINE_S)
    writer = open_registry(restarted.url, snapshot=False)
    closing.append(writer)
    await writer.heartbeat(beat(KEY_SHORT))

    async def seen() -> bool:
        return registry.peek(KEY_SHORT) is not None

    await eventually(seen, RECOVERY_DEADLINE_S)
    assert await registry.get(KEY_LONG) is None
    assert registry.stats.subscriber_reconnects >= 1


async def test_killed_subscriber_catches_up(
    tmp_path: Path, processes: list[RedisProcess], closing: list[Registry]
) -> None:
    server = start_redis(tmp_path)
    processes.append(server)
    registry = snapshot_of(server.url, resync_interval_s=60.0)
    closing.append(registry)
    await registry.start()
    writer = open_registry(server.url, snapshot=False)
    closing.append(writer)
    admin = redis.asyncio.from_url(server.url)
    keys = [f"{i:02x}" * 32 for i in range(16, 40)]

    try:
        # Heartbeats go on while the subscriber connection is killed twice: the events
        # published in between are lost, and only a reload can bring those keys.
        for index, key in enumerate(keys):
            if index in (4, 14):
                killed = await admin.client_kill_filter(_type="pubsub")
                assert killed >= 1
            await writer.heartbeat(beat(key))
    finally:
        await admin.aclose()

    async def caught_up() -> bool:
        return all(registry.peek(key) is not None for key in keys)

    await eventually(caught_up, RECOVERY_DEADLINE_S)
    assert registry.stats.subscriber_reconnects >= 1
    assert registry.stats.read_throughs == 0


@pytest.mark.parametrize("snapshot", [True, False], ids=["snapshot", "plain"])
async def test_cancelled_lookups_never_mix_answers(
    tmp_path: Path, processes: list[RedisProcess], closing: list[Registry], snapshot: bool
) -> None:
    server = start_redis(tmp_path)
    processes.append(server)
    relay = SlowRelay(server.port, delay_s=0.005)
    await relay.start()
    url = f"redis://127.0.0.1:{relay.port}/0"
    inner = RedisRegistry.from_url(url, timeout_s=2.0)
    registry: Registry = (
        SnapshotRegistry(inner, timeout_s=2.0, max_read_throughs=64) if snapshot else inner
    )
    closing.append(registry)
    await registry.start()

    # Written without the script, so no event reaches the snapshot: a wave's first get
    # of a key reads Redis through the relay, and each wave has keys of its own.
    keys = [f"{i:02x}" * 32 for i in range(64, 224)]
    await _write_raw(server.port, keys)
    rng = random.Random(7)
    lookups: list[str] = []
    tasks: list[asyncio.Task[ProviderEntry | None]] = []
    loop = asyncio.get_running_loop()
    # Waves of 80: redis-py's pool allows 100 connections and raises beyond that.
    for first in range(0, len(keys), 40):
        wave = [rng.choice([*keys[first : first + 40], KEY_ABSENT]) for _ in range(80)]
        started = [asyncio.create_task(registry.get(key), name="lookup") for key in wave]
        for task in started:
            if rng.random() < 0.4:
                loop.call_later(rng.uniform(0, 0.03), task.cancel, "test cancels the lookup")
        await asyncio.wait(started)
        lookups += wave
        tasks += started
    await relay.aclose()

    completed = [(k, t.result()) for k, t in zip(lookups, tasks, strict=True) if not t.cancelled()]
    cancelled = sum(t.cancelled() for t in tasks)
    print(f"\n{len(completed)} lookups completed, {cancelled} cancelled")
    assert cancelled > 50
    assert len(completed) > 100
    for key, entry in completed:
        if key == KEY_ABSENT:
            assert entry is None
        else:
            assert entry is not None
            assert entry.pubkey == key
            assert entry.model == f"model-{key[:2]}"
    if isinstance(registry, SnapshotRegistry):
        assert registry.stats.coalesced_waits > 0


async def _write_raw(port: int, keys: list[str]) -> None:
    client = redis.asyncio.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        now_s, _ = await client.time()
        endpoint = {"owner": "alice", "instance_id": "", "registered_at": now_s}
        endpoint |= {"last_heartbeat": now_s, "expires_at": now_s + 60}
        for key in keys:
            value = {
                "model": f"model-{key[:2]}",
                "signing_algo": "ed25519",
                "endpoints": {URL_1: endpoint},
            }
            await client.hset("e2ee:providers", key, orjson.dumps(value))
    finally:
        await client.aclose()


async def test_plain_backend_ready_follows_calls(
    tmp_path: Path, processes: list[RedisProcess], closing: list[Registry]
) -> None:
    port = free_port()
    registry = open_registry(f"redis://127.0.0.1:{port}/0", timeout_s=TIMEOUT_S, snapshot=False)
    closing.append(registry)
    await registry.start()
    ready_before_any_call = registry.ready

    with pytest.raises(RegistryUnavailable):
        await registry.ping()
    ready_after_failure = registry.ready
    processes.append(start_redis(tmp_path, port=port))
    await registry.ping()

    assert ready_before_any_call
    assert not ready_after_failure
    assert registry.ready


async def test_memory_registry_always_ready() -> None:
    registry = MemoryRegistry()

    await registry.start()

    assert registry.ready


async def test_silent_subscriber_reveals_outage(
    tmp_path: Path, processes: list[RedisProcess], closing: list[Registry]
) -> None:
    server = start_redis(tmp_path)
    processes.append(server)
    registry = snapshot_of(server.url)
    closing.append(registry)
    await registry.start()
    await registry.heartbeat(beat(KEY_LONG))
    # Let the re-read that follows the heartbeat's own event finish before the freeze.
    await eventually(_event_applied(registry), 2.0)
    await asyncio.sleep(0.1)

    # No lookup misses the snapshot: only the PING on the subscription can notice.
    server.freeze()
    noticed_s = await eventually(_failure_recorded(registry), 2.0)
    unknown_s, unknown = await timed(registry.get(KEY_UNKNOWN))
    known = await registry.get(KEY_LONG)

    print(f"\nsilent Redis noticed after {noticed_s:.2f} s without lookups")
    assert noticed_s < 0.2 + TIMEOUT_S + 0.6
    assert isinstance(unknown, RegistryUnavailable)
    assert unknown_s < 0.05
    assert known is not None


def _failure_recorded(registry: SnapshotRegistry) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return registry.stats.redis_errors > 0

    return check


def _event_applied(registry: SnapshotRegistry) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return registry.stats.events_applied > 0

    return check


PINGS_CHECKED = 50


class _LateLoopSubscription:
    """A subscription on a fake clock whose replies are prompt but whose reads return late.

    Each ``next_event`` advances the clock by its wait plus ``lateness_s``, as a busy
    event loop does. With ``replies``, the first call after a PING reads its reply 1 ms
    later. The ``PINGS_CHECKED``-th PING closes ``sync``, which ends its pump loop.
    """

    def __init__(
        self, clock: list[float], sync: SnapshotSync, *, lateness_s: float, replies: bool
    ) -> None:
        self._clock = clock
        self._sync = sync
        self._lateness_s = lateness_s
        self._replies = replies
        self._reply_due = False
        self.subscriptions = 1
        self.received_at = clock[0]
        self.ping_times: list[float] = []

    async def ping(self) -> None:
        self.ping_times.append(self._clock[0])
        self._reply_due = self._replies
        if len(self.ping_times) == PINGS_CHECKED:
            self._sync.closed = True

    async def next_event(self, wait_s: float) -> None:
        await asyncio.sleep(0)
        if self._reply_due:
            self._clock[0] += 0.001
            self._reply_due = False
            self.received_at = self._clock[0]
        else:
            self._clock[0] += wait_s + self._lateness_s


def _sync_on_clock(clock: list[float]) -> SnapshotSync:
    """Return a snapshot's sync state on a fake clock, with a 1 s health check interval."""
    return SnapshotSync(
        RedisRegistry.from_url("redis://127.0.0.1:1/0", timeout_s=TIMEOUT_S),
        outage_grace_s=GRACE_S,
        resync_interval_s=60.0,
        timeout_s=TIMEOUT_S,
        health_check_interval_s=1.0,
        max_backoff_s=0.3,
        monotonic=lambda: clock[0],
    )


@pytest.mark.parametrize("lateness_s", [0.0, 0.02, 0.2])
async def test_late_loop_replied_pings_stay_healthy(lateness_s: float) -> None:
    # Every PING gets its reply within 1 ms; only the loop that reads the replies is late.
    clock = [1000.0]
    sync = _sync_on_clock(clock)
    subscription = _LateLoopSubscription(clock, sync, lateness_s=lateness_s, replies=True)

    # Returns once the last PING was sent; a false alarm raises RegistryUnavailable.
    await sync._pump(cast(EventSubscription, subscription), _Backoff(0.1, 0.3))

    assert len(subscription.ping_times) == PINGS_CHECKED
    assert sync.unreachable_since is None


async def test_unanswered_ping_detected_within_timeout() -> None:
    clock = [1000.0]
    sync = _sync_on_clock(clock)
    subscription = _LateLoopSubscription(clock, sync, lateness_s=0.0, replies=False)

    with pytest.raises(RegistryUnavailable, match="no reply to PING"):
        await sync._pump(cast(EventSubscription, subscription), _Backoff(0.1, 0.3))

    assert subscription.ping_times == [1001.0]
    assert clock[0] - subscription.ping_times[0] <= TIMEOUT_S + 0.5
