"""The Redis layout as admins see it, checked on a real redis-server with the default prefix."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
import pytest
import redis.asyncio
import redis.exceptions

from registry import (
    CompletionRecord,
    Heartbeat,
    HeartbeatOutcome,
    RedisRegistry,
    RegistryError,
    RegistryUnavailable,
    open_registry,
    redis_backend,
)

pytestmark = pytest.mark.redis_server

KEY = "d4" * 32
URL_1 = "http://192.0.2.1:8000"
URL_2 = "http://192.0.2.2:8000"
SHORT_TTL_S = 0.2
ENTRY_FIELDS = {"model", "signing_algo", "endpoints"}
ENDPOINT_FIELDS = {"owner", "instance_id", "registered_at", "last_heartbeat", "expires_at"}
EVENT_FIELDS = {"event", "pubkey", "model", "url"}


def beat(url: str = URL_1, *, ttl_s: float = 60.0, instance_id: str = "inst-1") -> Heartbeat:
    return Heartbeat(KEY, "llama", url, "ed25519", "alice", ttl_s, instance_id)


@pytest.fixture
async def registry(redis_url: str) -> AsyncIterator[RedisRegistry]:
    opened = open_registry(redis_url, snapshot=False)
    assert isinstance(opened, RedisRegistry)
    yield opened
    await opened.aclose()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client that reads the keys the way an admin would."""
    client = redis.asyncio.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def wait_until_past(registry: RedisRegistry, when: float) -> None:
    deadline = time.monotonic() + 3.0
    while await registry.now() <= when:
        assert time.monotonic() < deadline, f"Redis TIME did not pass {when}"
        await asyncio.sleep(0.02)


async def stored_entry(raw: redis.asyncio.Redis, pubkey: str = KEY) -> dict[str, Any]:
    value = await raw.hget("e2ee:providers", pubkey)
    assert value is not None, "no e2ee:providers field for the key"
    decoded: dict[str, Any] = json.loads(value)
    return decoded


async def test_providers_hash_value_matches_layout(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    result = await registry.heartbeat(beat())
    redis_now = await registry.now()

    entry = await stored_entry(raw)

    assert set(entry) == ENTRY_FIELDS
    assert entry["model"] == "llama"
    assert entry["signing_algo"] == "ed25519"
    assert isinstance(entry["endpoints"], dict)
    assert list(entry["endpoints"]) == [URL_1]
    endpoint = entry["endpoints"][URL_1]
    assert set(endpoint) == ENDPOINT_FIELDS
    assert endpoint["owner"] == "alice"
    assert endpoint["instance_id"] == "inst-1"
    assert endpoint["expires_at"] == result.expires_at
    assert endpoint["registered_at"] == endpoint["last_heartbeat"]
    assert redis_now - 1.0 < endpoint["last_heartbeat"] <= redis_now


async def test_expiry_zset_member_and_score(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    await registry.heartbeat(beat(URL_1))
    await registry.heartbeat(beat(URL_2, ttl_s=90.0))

    members = cast(list[tuple[str, float]], await raw.zrange("e2ee:expiry", 0, -1, withscores=True))
    entry = await stored_entry(raw)

    assert [m for m, _ in members] == [f"{KEY} {URL_1}", f"{KEY} {URL_2}"]
    assert members[0][1] == entry["endpoints"][URL_1]["expires_at"]
    assert members[1][1] == entry["endpoints"][URL_2]["expires_at"]


async def test_models_hash_holds_last_heartbeat(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    await registry.heartbeat(beat())

    value = await raw.hget("e2ee:models", "llama")
    entry = await stored_entry(raw)

    assert value is not None
    assert float(value) == entry["endpoints"][URL_1]["last_heartbeat"]


async def test_redis_cli_hget_reads_entry(registry: RedisRegistry, redis_url: str) -> None:
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is not installed")
    await registry.heartbeat(beat())
    port = redis_url.rsplit(":", 1)[1].split("/")[0]

    completed = await asyncio.to_thread(
        subprocess.run,
        [cli, "-p", port, "HGET", "e2ee:providers", KEY],
        capture_output=True,
        check=True,
        timeout=5,
    )
    printed = json.loads(completed.stdout)
    [entry] = await registry.entries()

    assert printed["model"] == entry.model
    assert printed["signing_algo"] == entry.signing_algo
    endpoint = entry.endpoints[0]
    assert printed["endpoints"] == {
        endpoint.url: {
            "owner": endpoint.owner,
            "instance_id": endpoint.instance_id,
            "registered_at": endpoint.registered_at,
            "last_heartbeat": endpoint.last_heartbeat,
            "expires_at": endpoint.expires_at,
        }
    }


async def test_completion_records_are_strings_with_expiry(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    # A full batch goes through the script in one call; redis-cli GET and TTL read it.
    records = [(f"chatcmpl-{i}", CompletionRecord(URL_1, KEY, "llama")) for i in range(500)]
    records.append(("chatcmpl-7", CompletionRecord(URL_2, KEY, "llama")))

    await registry.record_completions(records, 30)

    assert await raw.type("e2ee:chats:chatcmpl-0") == "string"
    assert orjson.loads(await raw.get("e2ee:chats:chatcmpl-499")) == {
        "url": URL_1,
        "pubkey": KEY,
        "model": "llama",
    }
    # The later record of the same id in the batch wins.
    assert orjson.loads(await raw.get("e2ee:chats:chatcmpl-7"))["url"] == URL_2
    ttls = [await raw.pttl(f"e2ee:chats:chatcmpl-{i}") for i in (0, 250, 499)]
    assert all(25_000 < ttl <= 30_000 for ttl in ttls), ttls
    assert len(await raw.keys("e2ee:chats:*")) == 500


async def test_empty_completion_batch_sends_nothing(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    await raw.config_resetstat()

    await registry.record_completions([], 30)

    stats = await raw.info("commandstats")
    assert "cmdstat_evalsha" not in stats
    assert "cmdstat_eval" not in stats


async def test_last_endpoint_removal_deletes_field(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    await registry.heartbeat(beat(URL_1))
    await registry.heartbeat(beat(URL_2))

    await registry.deregister(KEY, url=URL_1, identity="alice")
    remaining = await stored_entry(raw)
    await registry.deregister(KEY, url=URL_2, identity="alice")

    assert isinstance(remaining["endpoints"], dict)
    assert list(remaining["endpoints"]) == [URL_2]
    assert await raw.hexists("e2ee:providers", KEY) is False
    assert await raw.zcard("e2ee:expiry") == 0


async def test_reap_deletes_field_and_members(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    result = await registry.heartbeat(beat(ttl_s=SHORT_TTL_S))
    await wait_until_past(registry, result.expires_at)

    assert await registry.reap() == 1
    assert await raw.hexists("e2ee:providers", KEY) is False
    assert await raw.zcard("e2ee:expiry") == 0


async def test_reap_runs_batches_until_done(
    registry: RedisRegistry, raw: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_backend, "REAP_BATCH", 2)
    last = None
    for index in range(5):
        last = await registry.heartbeat(beat(f"http://192.0.2.{index}:8000", ttl_s=SHORT_TTL_S))
    assert last is not None
    await wait_until_past(registry, last.expires_at)

    assert await registry.reap() == 5
    assert await raw.zcard("e2ee:expiry") == 0


async def test_reap_drops_stale_index_member(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    await raw.zadd("e2ee:expiry", {f"{KEY} {URL_1}": 1.0})

    assert await registry.reap() == 0
    assert await raw.zcard("e2ee:expiry") == 0


async def test_owner_deregister_sets_retired_key(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    await registry.heartbeat(beat(ttl_s=30.0, instance_id="inst-7"))

    await registry.deregister(KEY, url=URL_1, identity="alice")
    ttl_ms = await raw.pttl("e2ee:retired:inst-7")
    value = await raw.get("e2ee:retired:inst-7")
    redis_now = await registry.now()

    assert 29_000 < ttl_ms <= 30_000
    assert value is not None
    marks = json.loads(value)
    assert list(marks) == [f"{KEY} {URL_1}"]
    assert marks[f"{KEY} {URL_1}"] == pytest.approx(redis_now + 30.0, abs=1.0)


async def test_retired_marks_merge_per_instance(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    await registry.heartbeat(beat(URL_1, ttl_s=30.0, instance_id="inst-7"))
    await registry.heartbeat(beat(URL_2, ttl_s=90.0, instance_id="inst-7"))

    await registry.deregister(KEY, url=URL_2, identity="alice")
    await registry.deregister(KEY, url=URL_1, identity="alice")
    value = await raw.get("e2ee:retired:inst-7")
    ttl_ms = await raw.pttl("e2ee:retired:inst-7")

    assert value is not None
    assert sorted(json.loads(value)) == [f"{KEY} {URL_1}", f"{KEY} {URL_2}"]
    assert 89_000 < ttl_ms <= 90_000


async def test_admin_eviction_sets_no_retired_key(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    await registry.heartbeat(beat(instance_id="inst-7"))

    await registry.deregister(KEY, url=URL_1, identity=None)

    assert await raw.exists("e2ee:retired:inst-7") == 0


async def test_retired_heartbeat_writes_nothing(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    retired_until = await registry.now() + 30.0
    await raw.set("e2ee:retired:inst-7", json.dumps({f"{KEY} {URL_1}": retired_until}))

    result = await registry.heartbeat(beat(instance_id="inst-7"))

    assert result.outcome is HeartbeatOutcome.RETIRED
    assert await raw.exists("e2ee:providers", "e2ee:expiry", "e2ee:models") == 0


async def test_events_published_for_each_change(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    pubsub = raw.pubsub()
    await pubsub.subscribe("e2ee:events")
    try:
        confirmation = await pubsub.get_message(timeout=1.0)
        assert confirmation is not None
        assert confirmation["type"] == "subscribe"

        await registry.heartbeat(beat(URL_1))
        await registry.heartbeat(beat(URL_1))
        await registry.heartbeat(beat(URL_2))
        await registry.deregister(KEY, url=None, identity="alice")
        short = await registry.heartbeat(beat(URL_1, ttl_s=SHORT_TTL_S, instance_id="inst-2"))
        await wait_until_past(registry, short.expires_at)
        await registry.reap()
        events = await read_events(pubsub, count=7)
    finally:
        await pubsub.aclose()

    assert all(set(e) == EVENT_FIELDS for e in events)
    assert all(e["pubkey"] == KEY for e in events)
    assert all(e["model"] == "llama" for e in events)
    assert [(e["event"], e["url"]) for e in events] == [
        ("register", URL_1),
        ("refresh", URL_1),
        ("register", URL_2),
        ("deregister", URL_1),
        ("deregister", URL_2),
        ("register", URL_1),
        ("expire", URL_1),
    ]


async def test_heartbeat_announces_dropped_lease(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    pubsub = raw.pubsub()
    await pubsub.subscribe("e2ee:events")
    try:
        confirmation = await pubsub.get_message(timeout=1.0)
        assert confirmation is not None

        short = await registry.heartbeat(beat(URL_1, ttl_s=SHORT_TTL_S))
        await wait_until_past(registry, short.expires_at)
        await registry.heartbeat(beat(URL_2))
        events = await read_events(pubsub, count=3)
    finally:
        await pubsub.aclose()

    assert [(e["event"], e["url"]) for e in events] == [
        ("register", URL_1),
        ("expire", URL_1),
        ("register", URL_2),
    ]
    assert await raw.zrange("e2ee:expiry", 0, -1) == [f"{KEY} {URL_2}"]


async def read_events(pubsub: Any, count: int) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    deadline = time.monotonic() + 3.0
    while len(events) < count and time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None:
            events.append(orjson.loads(message["data"]))
    return events


async def test_heartbeat_survives_script_flush(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    await registry.heartbeat(beat())
    await raw.script_flush()

    result = await registry.heartbeat(beat())

    assert result.outcome is HeartbeatOutcome.REFRESHED


async def test_wrong_key_type_raises_registry_error(
    registry: RedisRegistry, raw: redis.asyncio.Redis
) -> None:
    await raw.set("e2ee:providers", "not a hash")

    with pytest.raises(RegistryError) as caught:
        await registry.get(KEY)

    assert not isinstance(caught.value, RegistryUnavailable)
    assert isinstance(caught.value.__cause__, redis.exceptions.ResponseError)


async def test_malformed_entry_skipped_and_overwritten(
    registry: RedisRegistry, raw: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await raw.hset("e2ee:providers", KEY, "{not json")

    assert await registry.get(KEY) is None
    assert await registry.entries() == []
    warnings = [r for r in caplog.records if r.name == "registry.redis_backend"]
    assert len(warnings) == 1
    assert KEY not in warnings[0].getMessage()
    result = await registry.heartbeat(beat())
    assert result.outcome is HeartbeatOutcome.REGISTERED


async def test_cancelled_lookup_leaves_no_stale_reply(registry: RedisRegistry) -> None:
    other_key = "e5" * 32
    await registry.heartbeat(beat())
    await registry.heartbeat(Heartbeat(other_key, "qwen", URL_2, "ed25519", "bob", 60.0))

    for _ in range(50):
        cancelled = asyncio.create_task(registry.get(KEY), name="cancelled-get")
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.wait([cancelled])
        entry = await registry.get(other_key)

        assert entry is not None
        assert entry.model == "qwen"


async def test_unavailable_when_nothing_listens(unused_tcp_port: int) -> None:
    registry = open_registry(
        f"redis://127.0.0.1:{unused_tcp_port}/0", timeout_s=0.5, snapshot=False
    )
    try:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable):
            await registry.get(KEY)
        with pytest.raises(RegistryUnavailable):
            await registry.heartbeat(beat())
        with pytest.raises(RegistryUnavailable):
            await registry.ping()
        elapsed = time.monotonic() - started
    finally:
        await registry.aclose()

    assert elapsed < 1.0


async def test_unavailable_when_server_is_silent() -> None:
    with socket.socket() as silent:
        # Accepts connections through the kernel backlog and never replies.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        registry = open_registry(f"redis://127.0.0.1:{port}/0", timeout_s=0.2, snapshot=False)
        try:
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable) as caught:
                await registry.get(KEY)
            elapsed = time.monotonic() - started
        finally:
            await registry.aclose()

    assert elapsed < 1.0
    assert isinstance(caught.value.__cause__, redis.exceptions.TimeoutError)
