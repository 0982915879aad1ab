"""Registry contract: the same cases against memory, fakeredis and a real redis-server.

Expiry runs on each backend's own clock: the memory backend's injected clock is moved
forward, the Redis backends are polled until Redis ``TIME`` has passed the lease end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import fakeredis
import pytest

from registry import (
    CompletionRecord,
    DeregisterForbidden,
    Heartbeat,
    HeartbeatOutcome,
    KeyNotFound,
    MemoryRegistry,
    RedisRegistry,
    Registry,
    open_registry,
)

KEY_A = "a1" * 32
KEY_B = "b2" * 32
KEY_ECDSA = "c3" * 64
URL_1 = "http://192.0.2.1:8000"
URL_2 = "http://192.0.2.2:8000"
URL_3 = "http://192.0.2.3:8000/prefix"
SHORT_TTL_S = 0.2
LONG_TTL_S = 60.0
WAIT_DEADLINE_S = 3.0


class FakeClock:
    """Unix clock for the memory backend that moves only when a test moves it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.value = start

    def __call__(self) -> float:
        return self.value


@dataclass
class Backend:
    """A registry under test plus a way to let its clock pass a given time."""

    name: str
    registry: Registry
    clock: FakeClock | None = None

    async def advance_past(self, when: float) -> None:
        """Return once the registry clock is strictly after ``when``."""
        if self.clock is not None:
            self.clock.value = max(self.clock.value, when) + 0.001
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_DEADLINE_S
        while await self.registry.now() <= when:
            assert loop.time() < deadline, f"registry clock did not pass {when}"
            await asyncio.sleep(0.02)


@pytest.fixture(
    params=[
        "memory",
        "fakeredis",
        pytest.param("redis", marks=pytest.mark.redis_server),
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()
        yield Backend("memory", MemoryRegistry(clock), clock)
        return
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        registry: Registry = RedisRegistry(client)
    else:
        registry = open_registry(request.getfixturevalue("redis_url"))
    try:
        yield Backend(request.param, registry)
    finally:
        await registry.aclose()


def beat(
    pubkey: str = KEY_A,
    url: str = URL_1,
    *,
    owner: str = "alice",
    model: str = "llama",
    ttl_s: float = LONG_TTL_S,
    instance_id: str = "inst-1",
) -> Heartbeat:
    algo = "ed25519" if len(pubkey) == 64 else "ecdsa"
    return Heartbeat(pubkey, model, url, algo, owner, ttl_s, instance_id)


async def test_heartbeat_registers_new_endpoint(backend: Backend) -> None:
    registry = backend.registry
    before = await registry.now()

    result = await registry.heartbeat(beat())
    entry = await registry.get(KEY_A)

    assert result.outcome is HeartbeatOutcome.REGISTERED
    assert entry is not None
    assert entry.model == "llama"
    assert entry.signing_algo == "ed25519"
    assert [e.url for e in entry.endpoints] == [URL_1]
    endpoint = entry.endpoints[0]
    assert endpoint.owner == "alice"
    assert endpoint.instance_id == "inst-1"
    assert endpoint.expires_at == result.expires_at
    assert endpoint.expires_at - endpoint.last_heartbeat == pytest.approx(LONG_TTL_S, abs=0.002)
    assert endpoint.registered_at == endpoint.last_heartbeat
    assert endpoint.registered_at >= before - 0.001


async def test_heartbeat_ecdsa_key_registers(backend: Backend) -> None:
    result = await backend.registry.heartbeat(beat(KEY_ECDSA))
    entry = await backend.registry.get(KEY_ECDSA)

    assert result.outcome is HeartbeatOutcome.REGISTERED
    assert entry is not None
    assert entry.signing_algo == "ecdsa"


async def test_get_unknown_key_returns_none(backend: Backend) -> None:
    assert await backend.registry.get(KEY_B) is None


async def test_heartbeat_refresh_keeps_registered_at(backend: Backend) -> None:
    registry = backend.registry
    first = await registry.heartbeat(beat(instance_id="inst-1"))
    entry = await registry.get(KEY_A)
    assert entry is not None
    registered_at = entry.endpoints[0].registered_at
    await backend.advance_past(registered_at + 0.005)

    second = await registry.heartbeat(beat(instance_id="inst-2"))
    refreshed = await registry.get(KEY_A)

    assert second.outcome is HeartbeatOutcome.REFRESHED
    assert second.expires_at > first.expires_at
    assert refreshed is not None
    assert refreshed.endpoints[0].registered_at == registered_at
    assert refreshed.endpoints[0].last_heartbeat > registered_at
    assert refreshed.endpoints[0].instance_id == "inst-2"


async def test_expired_endpoint_hidden_before_reap(backend: Backend) -> None:
    registry = backend.registry
    result = await registry.heartbeat(beat(ttl_s=SHORT_TTL_S))
    await backend.advance_past(result.expires_at)

    assert await registry.get(KEY_A) is None
    assert await registry.by_model("llama") == []
    assert await registry.live_models() == []
    stored = await registry.entries()
    assert [e.pubkey for e in stored] == [KEY_A]
    assert stored[0].endpoints[0].expires_at == result.expires_at


async def test_reap_removes_only_expired_endpoints(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(KEY_A, URL_1, ttl_s=LONG_TTL_S))
    short = await registry.heartbeat(beat(KEY_A, URL_2, ttl_s=SHORT_TTL_S))
    await registry.heartbeat(beat(KEY_B, URL_1, ttl_s=SHORT_TTL_S))
    await backend.advance_past(short.expires_at)

    removed = await registry.reap()
    stored = await registry.entries()

    assert removed == 2
    assert [e.pubkey for e in stored] == [KEY_A]
    assert [e.url for e in stored[0].endpoints] == [URL_1]
    assert await registry.reap() == 0


async def test_endpoints_share_one_key(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(url=URL_2, owner="alice"))
    await registry.heartbeat(beat(url=URL_1, owner="bob"))
    await registry.heartbeat(beat(url=URL_3, owner="alice"))

    entry = await registry.get(KEY_A)

    assert entry is not None
    assert [e.url for e in entry.endpoints] == [URL_1, URL_2, URL_3]
    assert [e.owner for e in entry.endpoints] == ["bob", "alice", "alice"]


async def test_heartbeat_other_owner_conflicts(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(owner="alice"))

    result = await registry.heartbeat(beat(owner="mallory", instance_id="inst-9"))
    entry = await registry.get(KEY_A)

    assert result.outcome is HeartbeatOutcome.OWNER_CONFLICT
    assert entry is not None
    assert entry.endpoints[0].owner == "alice"
    assert entry.endpoints[0].instance_id == "inst-1"


async def test_heartbeat_other_model_conflicts(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(url=URL_1, model="llama"))

    result = await registry.heartbeat(beat(url=URL_2, model="qwen"))
    entry = await registry.get(KEY_A)

    assert result.outcome is HeartbeatOutcome.MODEL_CONFLICT
    assert result.bound_model == "llama"
    assert entry is not None
    assert [e.url for e in entry.endpoints] == [URL_1]
    assert await registry.by_model("qwen") == []


async def test_heartbeat_takes_over_expired_owner(backend: Backend) -> None:
    registry = backend.registry
    old = await registry.heartbeat(beat(owner="alice", ttl_s=SHORT_TTL_S))
    await backend.advance_past(old.expires_at)

    result = await registry.heartbeat(beat(owner="bob", instance_id="inst-2"))
    entry = await registry.get(KEY_A)

    assert result.outcome is HeartbeatOutcome.REGISTERED
    assert entry is not None
    assert entry.endpoints[0].owner == "bob"
    assert entry.endpoints[0].registered_at == entry.endpoints[0].last_heartbeat


async def test_heartbeat_rebinds_expired_model(backend: Backend) -> None:
    registry = backend.registry
    old = await registry.heartbeat(beat(url=URL_1, model="llama", ttl_s=SHORT_TTL_S))
    await backend.advance_past(old.expires_at)

    result = await registry.heartbeat(beat(url=URL_2, model="qwen"))
    entry = await registry.get(KEY_A)
    stored = await registry.entries()

    assert result.outcome is HeartbeatOutcome.REGISTERED
    assert entry is not None
    assert entry.model == "qwen"
    assert [e.url for e in stored[0].endpoints] == [URL_2]


async def test_deregister_owner_one_url(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(url=URL_1))
    await registry.heartbeat(beat(url=URL_2))

    removed = await registry.deregister(KEY_A, url=URL_1, identity="alice")
    entry = await registry.get(KEY_A)

    assert removed == [URL_1]
    assert entry is not None
    assert [e.url for e in entry.endpoints] == [URL_2]


async def test_deregister_owner_all_urls_keeps_others(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(url=URL_1, owner="alice"))
    await registry.heartbeat(beat(url=URL_2, owner="alice"))
    await registry.heartbeat(beat(url=URL_3, owner="bob", instance_id="inst-b"))

    removed = await registry.deregister(KEY_A, url=None, identity="alice")
    entry = await registry.get(KEY_A)

    assert removed == [URL_1, URL_2]
    assert entry is not None
    assert [e.url for e in entry.endpoints] == [URL_3]


async def test_deregister_last_endpoint_removes_key(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat())

    await registry.deregister(KEY_A, url=None, identity="alice")

    assert await registry.get(KEY_A) is None
    assert await registry.entries() == []


async def test_deregister_admin_removes_every_endpoint(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(url=URL_1, owner="alice"))
    await registry.heartbeat(beat(url=URL_2, owner="bob", instance_id="inst-b"))

    removed = await registry.deregister(KEY_A, url=None, identity=None)

    assert removed == [URL_1, URL_2]
    assert await registry.entries() == []


async def test_deregister_admin_removes_named_url(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(url=URL_1, owner="alice"))
    await registry.heartbeat(beat(url=URL_2, owner="bob", instance_id="inst-b"))

    removed = await registry.deregister(KEY_A, url=URL_2, identity=None)
    entry = await registry.get(KEY_A)

    assert removed == [URL_2]
    assert entry is not None
    assert [e.url for e in entry.endpoints] == [URL_1]


async def test_deregister_other_owner_forbidden(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(url=URL_1, owner="alice"))

    with pytest.raises(DeregisterForbidden):
        await registry.deregister(KEY_A, url=URL_1, identity="mallory")
    with pytest.raises(DeregisterForbidden):
        await registry.deregister(KEY_A, url=None, identity="mallory")
    entry = await registry.get(KEY_A)

    assert entry is not None
    assert [e.url for e in entry.endpoints] == [URL_1]


async def test_deregister_unknown_key_not_found(backend: Backend) -> None:
    with pytest.raises(KeyNotFound):
        await backend.registry.deregister(KEY_B, url=None, identity="alice")
    with pytest.raises(KeyNotFound):
        await backend.registry.deregister(KEY_B, url=None, identity=None)


async def test_deregister_unknown_url_not_found(backend: Backend) -> None:
    await backend.registry.heartbeat(beat(url=URL_1))

    with pytest.raises(KeyNotFound):
        await backend.registry.deregister(KEY_A, url=URL_2, identity="alice")


async def test_deregister_expired_endpoint_before_reap(backend: Backend) -> None:
    registry = backend.registry
    result = await registry.heartbeat(beat(ttl_s=SHORT_TTL_S))
    await backend.advance_past(result.expires_at)

    removed = await registry.deregister(KEY_A, url=URL_1, identity="alice")

    assert removed == [URL_1]
    assert await registry.entries() == []


async def test_heartbeat_retired_instance_rejected(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(instance_id="inst-old"))
    await registry.deregister(KEY_A, url=URL_1, identity="alice")

    late = await registry.heartbeat(beat(instance_id="inst-old"))
    assert late.outcome is HeartbeatOutcome.RETIRED
    assert await registry.get(KEY_A) is None

    restarted = await registry.heartbeat(beat(instance_id="inst-new"))
    assert restarted.outcome is HeartbeatOutcome.REGISTERED


async def test_retired_instance_registers_other_key(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(KEY_A, instance_id="inst-1"))
    await registry.heartbeat(beat(KEY_B, instance_id="inst-1"))

    # A key rotation: the agent deregisters the old key and goes on with the new one.
    await registry.deregister(KEY_A, url=None, identity="alice")
    old_key = await registry.heartbeat(beat(KEY_A, instance_id="inst-1"))
    new_key = await registry.heartbeat(beat(KEY_B, instance_id="inst-1"))

    assert old_key.outcome is HeartbeatOutcome.RETIRED
    assert new_key.outcome is HeartbeatOutcome.REFRESHED


async def test_heartbeat_without_instance_id_never_retired(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(instance_id=""))
    await registry.deregister(KEY_A, url=URL_1, identity="alice")

    result = await registry.heartbeat(beat(instance_id=""))

    assert result.outcome is HeartbeatOutcome.REGISTERED


async def test_retired_instance_released_after_lease(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(instance_id="inst-old", ttl_s=SHORT_TTL_S))
    await registry.deregister(KEY_A, url=URL_1, identity="alice")
    # Redis expires keys at millisecond resolution: wait a little past the lease.
    await backend.advance_past((await registry.now()) + SHORT_TTL_S + 0.01)
    await registry.reap()

    result = await registry.heartbeat(beat(instance_id="inst-old"))

    assert result.outcome is HeartbeatOutcome.REGISTERED


async def test_admin_eviction_does_not_retire_instance(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(instance_id="inst-1"))
    await registry.deregister(KEY_A, url=URL_1, identity=None)

    result = await registry.heartbeat(beat(instance_id="inst-1"))

    assert result.outcome is HeartbeatOutcome.REGISTERED


async def test_by_model_returns_live_entries(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(KEY_B, URL_1, model="llama"))
    await registry.heartbeat(beat(KEY_A, URL_2, model="llama"))
    await registry.heartbeat(beat(KEY_ECDSA, URL_3, model="qwen"))

    llama = await registry.by_model("llama")

    assert [e.pubkey for e in llama] == [KEY_A, KEY_B]
    assert [e.pubkey for e in await registry.by_model("qwen")] == [KEY_ECDSA]
    assert await registry.by_model("absent") == []


async def test_by_model_drops_expired_endpoints(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(url=URL_1, ttl_s=LONG_TTL_S))
    short = await registry.heartbeat(beat(url=URL_2, ttl_s=SHORT_TTL_S))
    await backend.advance_past(short.expires_at)

    llama = await registry.by_model("llama")

    assert len(llama) == 1
    assert [e.url for e in llama[0].endpoints] == [URL_1]


async def test_live_models_sorted_and_live_only(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(KEY_A, model="qwen"))
    short = await registry.heartbeat(beat(KEY_B, model="llama", ttl_s=SHORT_TTL_S))
    await registry.heartbeat(beat(KEY_ECDSA, model="gemma"))

    assert await registry.live_models() == ["gemma", "llama", "qwen"]
    await backend.advance_past(short.expires_at)
    assert await registry.live_models() == ["gemma", "qwen"]


async def test_model_last_live_tracks_heartbeats(backend: Backend) -> None:
    registry = backend.registry
    assert await registry.model_last_live("llama") is None

    result = await registry.heartbeat(beat(ttl_s=SHORT_TTL_S))
    await backend.advance_past(result.expires_at)
    await registry.reap()
    last_live = await registry.model_last_live("llama")

    assert last_live is not None
    assert last_live == pytest.approx(result.expires_at - SHORT_TTL_S, abs=0.002)


async def test_conflicts_leave_model_last_live_unset(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(url=URL_1, model="llama"))

    await registry.heartbeat(beat(url=URL_2, model="qwen"))

    assert await registry.model_last_live("qwen") is None


async def test_entries_include_expired_endpoints(backend: Backend) -> None:
    registry = backend.registry
    await registry.heartbeat(beat(KEY_B, URL_1))
    short = await registry.heartbeat(beat(KEY_A, URL_2, ttl_s=SHORT_TTL_S))
    await backend.advance_past(short.expires_at)
    now = await registry.now()

    stored = await registry.entries()

    assert [e.pubkey for e in stored] == [KEY_A, KEY_B]
    assert not stored[0].endpoints[0].is_live(now)
    assert stored[1].endpoints[0].is_live(now)


async def test_ping_and_now_answer(backend: Backend) -> None:
    await backend.registry.ping()

    assert await backend.registry.now() > 1_600_000_000.0


async def test_completion_records_found_until_expiry(backend: Backend) -> None:
    registry = backend.registry
    first = CompletionRecord(URL_1, KEY_A, "llama")
    second = CompletionRecord(URL_2, KEY_A, "llama")
    start = await registry.now()

    await registry.record_completions([("chatcmpl-1", first), ("chatcmpl-2", second)], SHORT_TTL_S)

    assert await registry.find_completion("chatcmpl-1") == first
    assert await registry.find_completion("chatcmpl-2") == second
    assert await registry.find_completion("chatcmpl-3") is None
    await backend.advance_past(start + SHORT_TTL_S + 0.05)
    assert await registry.find_completion("chatcmpl-1") is None


async def test_completion_record_rewritten_by_later_write(backend: Backend) -> None:
    registry = backend.registry
    await registry.record_completions([("chatcmpl-1", CompletionRecord(URL_1, KEY_A, "m"))], 60)
    await registry.record_completions([("chatcmpl-1", CompletionRecord(URL_2, KEY_A, "m"))], 60)

    found = await registry.find_completion("chatcmpl-1")

    assert found is not None
    assert found.url == URL_2
