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

``read_snapshot``, ``read_entry``, ``read_entries`` and ``events`` serve the per-replica
snapshot (``registry.snapshot``): raw entries with the Redis clock, and the event stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

import orjson
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from registry.base import DeregisterForbidden, KeyNotFound, RegistryUnavailable
from registry.redis_io import EventSubscription, redis_errors
from registry.sentinel import SENTINEL_SCHEME, open_sentinel, parse_sentinel_url
from registry.types import (
    CompletionRecord,
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

    The instance takes ownership of ``client`` (and of ``sentinel``, when given) and
    closes it in ``aclose()``. The client should have ``socket_timeout`` and
    ``socket_connect_timeout`` set, or a frozen Redis makes every call hang; ``from_url``
    sets both.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = "e2ee",
        sentinel: Sentinel | None = None,
    ) -> None:
        if not prefix:
            raise ValueError("the Redis key prefix must not be empty")
        self._client = client
        self._sentinel = sentinel
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
        self._record_completions = client.register_script(_load_script("record_completions.lua"))
        self._malformed_warned: set[str] = set()
        self._reachable = True

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "e2ee", timeout_s: float = 0.5) -> RedisRegistry:
        """Create a registry on a new client for a redis, rediss or redis+sentinel URL.

        ``timeout_s`` bounds both connecting and each command. A failed connection is
        retried once at once (a pooled connection that Redis closed gets replaced); a
        timeout is not retried, so a call to a frozen Redis fails after about ``timeout_s``.
        Raises ValueError for a malformed URL.
        """
        # NOTE: a retried deregister whose first reply was lost raises KeyNotFound even
        # though the first attempt removed the endpoints.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        if url.partition("://")[0].lower() == SENTINEL_SCHEME:
            parsed = parse_sentinel_url(url)
            sentinel, client = open_sentinel(parsed, timeout_s=timeout_s, retry=retry)
            return cls(client, prefix=prefix, sentinel=sentinel)
        client = redis.asyncio.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=retry,
        )
        return cls(client, prefix=prefix)

    @property
    def ready(self) -> bool:
        """False after a command failed because Redis was unreachable, until one succeeds."""
        return self._reachable

    async def start(self) -> None:
        """Return at once: this backend keeps no state to load and connects on demand."""

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
        with self._command("heartbeat script"):
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
        with self._command("deregister script"):
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
        now, entry = await self.read_entry(pubkey)
        if entry is None:
            return None
        live = entry.live(now)
        return live if live.endpoints else None

    async def record_completions(
        self, records: Sequence[tuple[str, CompletionRecord]], ttl_s: float
    ) -> None:
        """SET each ``<prefix>:chats:<id>`` with its expiry (PX), with one script call."""
        if not records:
            return
        ttl_ms = max(1, int(ttl_s * 1000))
        keys = [f"{self.prefix}:chats:{chat_id}" for chat_id, _ in records]
        values = [orjson.dumps(record.to_json()) for _, record in records]
        with self._command("record_completions script"):
            await self._record_completions(keys=keys, args=[ttl_ms, *values])

    async def find_completion(self, chat_id: str) -> CompletionRecord | None:
        with self._command("GET"):
            raw = await self._client.get(f"{self.prefix}:chats:{chat_id}")
        if raw is None:
            return None
        try:
            return CompletionRecord.from_json(orjson.loads(raw))
        except orjson.JSONDecodeError:
            logger.warning("completion record %s... is not JSON; ignoring it", chat_id[:32])
            return None

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
        with self._command("HGET"):
            raw = await self._client.hget(self.models_key, model)
        return None if raw is None else float(raw)

    async def now(self) -> float:
        """Return Redis ``TIME`` in Unix seconds."""
        with self._command("TIME"):
            reply = await self._client.time()
        return _unix_time(reply)

    async def reap(self) -> int:
        """Remove ended leases in batches of REAP_BATCH; return the endpoints removed."""
        total = 0
        for _ in range(_REAP_MAX_BATCHES):
            with self._command("reap script"):
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
        with self._command("PING"):
            await self._client.ping()

    async def aclose(self) -> None:
        """Close the client and its connection pool, then the Sentinel clients, if any."""
        await self._client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    async def _read_all(self) -> tuple[float, list[ProviderEntry]]:
        """Return Redis ``TIME`` and every entry as stored, in one round trip (HGETALL)."""
        with self._command("HGETALL"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.providers_key)
                pipe.time()
                raw_entries, time_reply = await pipe.execute()
        decoded = (self._decode_or_warn(_text(k), v) for k, v in _sorted_items(raw_entries))
        return _unix_time(time_reply), [e for e in decoded if e is not None]

    async def read_snapshot(self) -> tuple[float, list[ProviderEntry], dict[str, float]]:
        """Return Redis ``TIME``, every entry as stored and each model's last live time.

        One round trip: HGETALL of the providers and the models hashes, and TIME.
        """
        with self._command("HGETALL"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.providers_key)
                pipe.hgetall(self.models_key)
                pipe.time()
                raw_entries, raw_models, time_reply = await pipe.execute()
        decoded = (self._decode_or_warn(_text(k), v) for k, v in _sorted_items(raw_entries))
        models: dict[str, float] = {}
        for model, last_live in raw_models.items():
            try:
                models[_text(model)] = float(last_live)
            except ValueError:
                continue
        return _unix_time(time_reply), [e for e in decoded if e is not None], models

    async def read_entry(self, pubkey: str) -> tuple[float, ProviderEntry | None]:
        """Return Redis ``TIME`` and the key's entry as stored, in one round trip (HGET)."""
        with self._command("HGET"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hget(self.providers_key, pubkey)
                pipe.time()
                raw, time_reply = await pipe.execute()
        entry = None if raw is None else self._decode_or_warn(pubkey, raw)
        return _unix_time(time_reply), entry

    async def read_entries(
        self, pubkeys: Sequence[str]
    ) -> tuple[float, dict[str, ProviderEntry | None]]:
        """Return Redis ``TIME`` and each key's entry as stored, in one round trip (HMGET)."""
        with self._command("HMGET"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hmget(self.providers_key, list(pubkeys))
                pipe.time()
                raw_values, time_reply = await pipe.execute()
        entries = {
            key: None if raw is None else self._decode_or_warn(key, raw)
            for key, raw in zip(pubkeys, raw_values, strict=True)
        }
        return _unix_time(time_reply), entries

    def events(
        self, *, timeout_s: float, monotonic: Callable[[], float] = time.monotonic
    ) -> EventSubscription:
        """Return an unopened subscription to the events channel, on its own connection.

        ``timeout_s`` bounds subscribing; each read waits as long as its caller specifies.
        """
        return EventSubscription(
            self._client.pubsub(), self.events_channel, timeout_s=timeout_s, monotonic=monotonic
        )

    @contextmanager
    def _command(self, operation: str) -> Iterator[None]:
        """Translate errors like ``redis_errors`` and record whether Redis replied."""
        try:
            with redis_errors(operation):
                yield
        except RegistryUnavailable:
            self._reachable = False
            raise
        self._reachable = True

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
