"""Redis URLs for high availability and security: Sentinel (parsing, failover) and TLS with ACL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from redis_processes import (
    RedisProcess,
    free_port,
    redis_processes,
    resp_command,
    start_redis,
    start_sentinel,
    write_self_signed_cert,
)

from registry import (
    Heartbeat,
    RedisRegistry,
    RegistryError,
    RegistryUnavailable,
    SnapshotRegistry,
    open_registry,
    redact_url,
)
from registry.sentinel import SENTINEL_URL_FORM, SentinelURL, parse_sentinel_url

KEY_BEFORE = "e1" * 32
KEY_AFTER = "e2" * 32
URL_1 = "http://192.0.2.1:8000"
SERVICE = "e2ee-master"
FAILOVER_DEADLINE_S = 20.0


def beat(pubkey: str) -> Heartbeat:
    return Heartbeat(pubkey, "llama", URL_1, "ed25519", "alice", 60.0, "inst-1")


def test_parse_several_hosts_db_and_credentials() -> None:
    parsed = parse_sentinel_url(
        "redis+sentinel://gateway:p%40ss%3Aword@10.0.0.1:26379,sentinel-2:26380,[::1]:5000/mymaster/3"
    )

    assert parsed.sentinels == (("10.0.0.1", 26379), ("sentinel-2", 26380), ("::1", 5000))
    assert parsed.service == "mymaster"
    assert parsed.db == 3
    assert parsed.username == "gateway"
    assert parsed.password == "p@ss:word"
    assert "p@ss" not in repr(parsed)


def test_parse_defaults() -> None:
    parsed = parse_sentinel_url("REDIS+SENTINEL://sentinel-1/mymaster/")

    assert parsed == SentinelURL((("sentinel-1", 26379),), "mymaster")
    assert parsed.username is None
    assert parsed.password is None


def test_parse_password_only() -> None:
    parsed = parse_sentinel_url("redis+sentinel://:s3cret@h1:26379/m")

    assert parsed.username is None
    assert parsed.password == "s3cret"


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://u:s3cret@h1:26379",
        "redis+sentinel://u:s3cret@h1:26379/",
        "redis+sentinel://u:s3cret@/mymaster",
        "redis+sentinel://u:s3cret@h1:26379,/mymaster",
        "redis+sentinel://u:s3cret@h1:notaport/mymaster",
        "redis+sentinel://u:s3cret@h1:70000/mymaster",
        "redis+sentinel://u:s3cret@::1:26379/mymaster",
        "redis+sentinel://u:s3cret@[::1/mymaster",
        "redis+sentinel://u:s3cret@h1:26379/mymaster/db1",
        "redis+sentinel://u:s3cret@h1:26379/mymaster/1/extra",
        "redis+sentinel://u:s3cret@h1:26379/mymaster?ssl=true",
        "redis://u:s3cret@h1:26379/mymaster",
    ],
)
def test_parse_bad_form_rejected(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_sentinel_url(url)

    assert SENTINEL_URL_FORM in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_open_registry_bad_sentinel_url_hides_password() -> None:
    with pytest.raises(ValueError, match="invalid registry URL") as caught:
        open_registry("redis+sentinel://u:s3cret@h1:26379")

    assert "s3cret" not in str(caught.value)
    assert "redis+sentinel://***@h1:26379" in str(caught.value)


def test_redact_url_masks_sentinel_credentials() -> None:
    redacted = redact_url("redis+sentinel://u:s3cret@h1:26379,h2:26380/m/1")

    assert redacted == "redis+sentinel://***@h1:26379,h2:26380/m/1"


async def test_open_registry_sentinel_url_connects_lazily() -> None:
    url = "redis+sentinel://u:s3cret@192.0.2.1:26379,192.0.2.2:26379/m/2"
    snapshot = open_registry(url)
    plain = open_registry(url, snapshot=False)
    try:
        assert isinstance(snapshot, SnapshotRegistry)
        assert isinstance(plain, RedisRegistry)
        assert snapshot.inner.providers_key == "e2ee:providers"
    finally:
        await snapshot.aclose()
        await plain.aclose()


def _role(server: RedisProcess) -> bytes:
    return resp_command(server.port, "ROLE").split(b"\r\n")[2]


@pytest.mark.redis_server
async def test_registry_follows_failover(tmp_path: Path) -> None:
    with redis_processes() as processes:
        # 1. A master, its replica, and one Sentinel that may fail over on its own.
        # Without the delay, the replica's first full sync starts at once instead of 5 s later.
        master = start_redis(tmp_path / "master", args=("--repl-diskless-sync-delay", "0"))
        processes.append(master)
        replica = start_redis(
            tmp_path / "replica", args=("--replicaof", "127.0.0.1", str(master.port))
        )
        processes.append(replica)
        sentinel = start_sentinel(tmp_path / "sentinel", master_port=master.port, service=SERVICE)
        processes.append(sentinel)

        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}/0"
        writer = open_registry(url, timeout_s=0.5)
        reader = open_registry(url, timeout_s=0.5)
        assert isinstance(reader, SnapshotRegistry)
        try:
            await writer.start()
            await reader.start()
            await writer.heartbeat(beat(KEY_BEFORE))
            assert (await reader.get(KEY_BEFORE)) is not None
            await _wait_replicated(replica, KEY_BEFORE)

            # 2. The master dies; heartbeats fail until the Sentinel promotes the replica.
            master.kill()
            killed_at = time.monotonic()
            while True:
                try:
                    await writer.heartbeat(beat(KEY_AFTER))
                    break
                except RegistryUnavailable:
                    assert time.monotonic() - killed_at < FAILOVER_DEADLINE_S, "no failover"
                    await asyncio.sleep(0.2)
            failover_s = time.monotonic() - killed_at

            # 3. Both replicas of the gateway work against the new master.
            deadline = time.monotonic() + 5.0
            while reader.peek(KEY_AFTER) is None:
                assert time.monotonic() < deadline, "the reader's subscription did not follow"
                await asyncio.sleep(0.05)
            print(f"\nwrites resumed {failover_s:.1f} s after the master was killed")
            assert _role(replica) == b"master"
            assert (await reader.get(KEY_BEFORE)) is not None
            assert reader.ready
        finally:
            await writer.aclose()
            await reader.aclose()


async def _wait_replicated(replica: RedisProcess, pubkey: str) -> None:
    deadline = time.monotonic() + 5.0
    while pubkey.encode() not in resp_command(replica.port, "HKEYS", "e2ee:providers"):
        assert time.monotonic() < deadline, "the replica did not receive the entry"
        await asyncio.sleep(0.05)


@pytest.mark.redis_server
async def test_rediss_url_with_acl_user(tmp_path: Path) -> None:
    cert, key = write_self_signed_cert(tmp_path / "tls")
    tls_port = free_port()
    tls_args: tuple[str, ...] = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert))
    tls_args += ("--tls-key-file", str(key), "--tls-ca-cert-file", str(cert))
    with redis_processes() as processes:
        server = start_redis(tmp_path / "redis", args=(*tls_args, "--tls-auth-clients", "no"))
        processes.append(server)
        # An ACL user limited to the registry's keys and channels; no default user.
        acl = ("ACL", "SETUSER", "gateway", "on", ">s3cret-pass", "~e2ee:*", "&e2ee:*", "+@all")
        assert resp_command(server.port, *acl).startswith(b"+OK")
        assert resp_command(server.port, "ACL", "SETUSER", "default", "off").startswith(b"+OK")

        url = f"rediss://gateway:s3cret-pass@127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        wrong = f"rediss://gateway:wrong-pass@127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        registry = open_registry(url, timeout_s=1.0)
        assert isinstance(registry, SnapshotRegistry)
        denied = open_registry(wrong, timeout_s=1.0, snapshot=False)
        try:
            await registry.start()
            result = await registry.heartbeat(beat(KEY_BEFORE))
            entry = await registry.get(KEY_BEFORE)
            ready = registry.ready
            # The heartbeat's own event arrives through the TLS subscription.
            deadline = time.monotonic() + 2.0
            while registry.stats.events_applied == 0:
                assert time.monotonic() < deadline, "no event through the subscription"
                await asyncio.sleep(0.01)
            with pytest.raises(RegistryError) as caught:
                await denied.ping()
        finally:
            await registry.aclose()
            await denied.aclose()

    assert ready
    assert entry is not None
    assert entry.endpoints[0].expires_at == result.expires_at
    assert "wrong-pass" not in str(caught.value)
