"""Registry backend on Redis (>= 6.2) through ``redis.asyncio``.

Layout, a public interface that admins read with redis-cli (``<p>`` is the prefix):

- ``<p>:providers`` HASH: normalised public key -> JSON ``{"model", "signing_algo",
  "endpoints": {"<url>": {"owner", "instance_id", "registered_at", "last_heartbeat",
  "expires_at"}}}``, times in Unix seconds from Redis ``TIME``, to the millisecond.
- ``<p>:expiry`` ZSET: member ``"<pubkey> <url>"``, score ``expires_at``.
- ``<p>:models`` HASH: model -> Unix time of its last heartbeat.
- ``<p>:events`` channel: JSON ``{"event", "pubkey", "model", "url"}`` with event
  ``register``, ``refresh``, ``deregister`` or ``expire``.
- ``<p>:retired:<instance_id>`` STRING: JSON ``{"<pubkey> <url>": retired_until}``, the
  endpoints that their owner deregistered while this agent instance sent their
  heartbeats, each retired for one lease length. The key expires with its last mark.

Each write is one Lua script from ``registry/lua`` that reads the clock with
``redis.call('TIME')``, so every gateway replica uses the same clock. Reads decode the
JSON here and drop endpoints whose ``expires_at`` is at or before Redis ``TIME``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import resources
from typing import Any

import orjson
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from registry.base import DeregisterForbidden, KeyNotFound, RegistryError, RegistryUnavailable
from registry.types import (
    Endpoint,
    Heartbeat,
    HeartbeatOutcome,
    HeartbeatResult,
    ProviderEntry,
)

__all__ = ["RedisRegistry"]

logger = logging.getLogger(__name__)

REAP_BATCH = 500
"""Max ZSET members that one reap script handles: Redis runs nothing else meanwhile."""

_REAP_MAX_BATCHES = 100
_MAX_MALFORMED_WARNED = 1024


def _load_script(name: str) -> str:
    return resources.files("registry").joinpath("lua", name).read_text(encoding="utf-8")


@contextmanager
def _redis_errors(operation: str) -> Iterator[None]:
    """Translate redis-py errors raised inside the block into registry errors.

    This is the only place where redis-py exception types are caught: connection,
    timeout and socket errors (and a replica that turned read-only during a failover)
    become RegistryUnavailable, any other Redis error RegistryError.
    """
    try:
        yield
    except (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.ReadOnlyError,
        OSError,
    ) as exc:
        raise RegistryUnavailable(f"Redis {operation} failed: {exc}") from exc
    except redis.exceptions.RedisError as exc:
        raise RegistryError(f"Redis {operation} failed: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _unix_time(reply: Any) -> float:
    """Convert a ``TIME`` reply (seconds, microseconds) to Unix seconds."""
    seconds, microseconds = reply
    return int(seconds) + int(microseconds) / 1_000_000


def _decode_entry(pubkey: str, raw: bytes | str) -> ProviderEntry:
    """Parse one ``<p>:providers`` value; raises ValueError when it is malformed."""
    try:
        data = orjson.loads(raw)
        endpoints = tuple(
            Endpoint(
                url=url,
                owner=str(ep["owner"]),
                instance_id=str(ep["instance_id"]),
                registered_at=float(ep["registered_at"]),
                last_heartbeat=float(ep["last_heartbeat"]),
                expires_at=float(ep["expires_at"]),
            )
            for url, ep in sorted(data["endpoints"].items())
        )
        return ProviderEntry(pubkey, str(data["model"]), str(data["signing_algo"]), endpoints)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed registry entry: {exc!r}") from exc


class RedisRegistry:
    """Registry stored in Redis, shared by every gateway replica that uses the same prefix.

    The instance takes ownership of ``client`` and closes it in ``aclose()``. The
    client should have ``socket_timeout`` and ``socket_connect_timeout`` set, or a
    frozen Redis makes every call hang; ``from_url`` sets both.
    """

    def __init__(self, client: redis.asyncio.Redis, *, prefix: str = "e2ee") -> None:
        if not prefix:
            raise ValueError("the Redis key prefix must not be empty")
        self._client = client
        self.prefix = prefix
        self.providers_key = f"{prefix}:providers"
        self.expiry_key = f"{prefix}:expiry"
        self.models_key = f"{prefix}:models"
        self.events_channel = f"{prefix}:events"
        self.retired_key_prefix = f"{prefix}:retired:"
        # Script objects send EVALSHA and fall back to SCRIPT LOAD on NOSCRIPT, so a
        # Redis restart that emptied the script cache costs one extra round trip.
        self._heartbeat = client.register_script(_load_script("heartbeat.lua"))
        self._deregister = client.register_script(_load_script("deregister.lua"))
        self._reap = client.register_script(_load_script("reap.lua"))
        self._malformed_warned: set[str] = set()

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "e2ee", timeout_s: float = 0.5) -> RedisRegistry:
        """Create a registry on a new client for a ``redis://`` or ``rediss://`` URL.

        ``timeout_s`` bounds both connecting and each command. A failed connection is
        retried once at once (a pooled connection that Redis closed gets replaced); a
        timeout is not retried, so a call to a frozen Redis fails after about ``timeout_s``.
        """
        # NOTE: a retried deregister whose first reply was lost raises KeyNotFound even
        # though the first attempt removed the endpoints.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        client = redis.asyncio.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=retry,
        )
        return cls(client, prefix=prefix)

    async def heartbeat(self, beat: Heartbeat) -> HeartbeatResult:
        """Register or renew one endpoint in one script; see ``Registry.heartbeat``."""
        keys = [
            self.providers_key,
            self.expiry_key,
            self.models_key,
            self.retired_key_prefix + beat.instance_id,
        ]
        args = [
            beat.pubkey,
            beat.model,
            beat.url,
            beat.signing_algo,
            beat.owner,
            repr(float(beat.ttl_s)),
            beat.instance_id,
            self.events_channel,
        ]
        with _redis_errors("heartbeat script"):
            reply = await self._heartbeat(keys=keys, args=args)
        outcome, expires_at, bound_model = (_text(part) for part in reply)
        return HeartbeatResult(HeartbeatOutcome(outcome), float(expires_at), bound_model)

    async def deregister(self, pubkey: str, *, url: str | None, identity: str | None) -> list[str]:
        """Remove endpoints of a key in one script; see ``Registry.deregister``."""
        args = [
            pubkey,
            url or "",
            "1" if identity is None else "0",
            identity or "",
            self.retired_key_prefix,
            self.events_channel,
        ]
        with _redis_errors("deregister script"):
            reply = await self._deregister(keys=[self.providers_key, self.expiry_key], args=args)
        status, *removed = (_text(part) for part in reply)

        if status == "not_found":
            where = f"endpoint {url}" if url else "endpoint"
            raise KeyNotFound(f"key {pubkey[:16]}… has no {where}")
        if status == "forbidden":
            raise DeregisterForbidden(f"identity owns no named endpoint of key {pubkey[:16]}…")
        return sorted(removed)

    async def get(self, pubkey: str) -> ProviderEntry | None:
        """Return the key's live entry (HGET and TIME in one round trip), or None."""
        with _redis_errors("HGET"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hget(self.providers_key, pubkey)
                pipe.time()
                raw, time_reply = await pipe.execute()
        if raw is None:
            return None
        entry = self._decode_or_warn(pubkey, raw)
        if entry is None:
            return None
        live = entry.live(_unix_time(time_reply))
        return live if live.endpoints else None

    async def by_model(self, model: str) -> list[ProviderEntry]:
        """Return the live entries serving ``model``, sorted by key."""
        now, stored = await self._read_all()
        live = (e.live(now) for e in stored if e.model == model)
        return [e for e in live if e.endpoints]

    async def entries(self) -> list[ProviderEntry]:
        """Return every stored entry, expired endpoints included, sorted by key."""
        _, stored = await self._read_all()
        return stored

    async def live_models(self) -> list[str]:
        """Return the sorted names of models with at least one live endpoint."""
        now, stored = await self._read_all()
        return sorted({e.model for e in stored if e.live(now).endpoints})

    async def model_last_live(self, model: str) -> float | None:
        """Return the time of the last heartbeat for ``model``, or None if never seen."""
        with _redis_errors("HGET"):
            raw = await self._client.hget(self.models_key, model)
        return None if raw is None else float(raw)

    async def now(self) -> float:
        """Return Redis ``TIME`` in Unix seconds."""
        with _redis_errors("TIME"):
            reply = await self._client.time()
        return _unix_time(reply)

    async def reap(self) -> int:
        """Remove ended leases in batches of REAP_BATCH; return the endpoints removed."""
        total = 0
        for _ in range(_REAP_MAX_BATCHES):
            with _redis_errors("reap script"):
                removed, handled = await self._reap(
                    keys=[self.providers_key, self.expiry_key],
                    args=[self.events_channel, REAP_BATCH],
                )
            total += int(removed)
            if int(handled) < REAP_BATCH:
                break
        if total:
            logger.info("reaped %d expired provider endpoints", total)
        return total

    async def ping(self) -> None:
        """Send PING; raise RegistryUnavailable when Redis is unreachable or times out."""
        with _redis_errors("PING"):
            await self._client.ping()

    async def aclose(self) -> None:
        """Close the client and its connection pool."""
        await self._client.aclose()

    async def _read_all(self) -> tuple[float, list[ProviderEntry]]:
        """Read the whole providers hash and the clock in one round trip."""
        with _redis_errors("HGETALL"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.providers_key)
                pipe.time()
                raw_entries, time_reply = await pipe.execute()
        decoded = (self._decode_or_warn(_text(k), v) for k, v in _sorted_items(raw_entries))
        return _unix_time(time_reply), [e for e in decoded if e is not None]

    def _decode_or_warn(self, pubkey: str, raw: bytes | str) -> ProviderEntry | None:
        """Decode an entry, or warn once per key and return None when it is malformed.

        A value edited by hand must not fail every read; the next heartbeat for the key
        overwrites it.
        """
        try:
            entry = _decode_entry(pubkey, raw)
        except ValueError as exc:
            if pubkey not in self._malformed_warned:
                if len(self._malformed_warned) >= _MAX_MALFORMED_WARNED:
                    self._malformed_warned.clear()
                self._malformed_warned.add(pubkey)
                logger.warning("skipping registry entry: key=%s… error=%s", pubkey[:16], exc)
            return None
        self._malformed_warned.discard(pubkey)
        return entry


def _sorted_items(mapping: Mapping[Any, Any]) -> list[tuple[Any, Any]]:
    return sorted(mapping.items(), key=lambda item: _text(item[0]))
