"""Per-replica snapshot of the Redis registry: lookups without a Redis round trip.

``SnapshotRegistry`` wraps a ``RedisRegistry``. It keeps every entry in memory, loaded
with HGETALL and kept current by the ``<prefix>:events`` channel, and serves ``get``
and ``by_model`` from memory when the snapshot has a positive result. A negative result
(which becomes a 421 for a pinned request) is always confirmed by Redis first, so a
replica whose snapshot misses a key costs one read, never a wrong 421.

Expiry runs on an estimate of Redis ``TIME``: the time of the last read plus the
monotonic time elapsed since, so an endpoint is dead at its expires_at without an event.

Outage timeline with the defaults (``timeout_s`` 0.5, ``health_check_interval_s`` 1,
``outage_grace_s`` 60). t=0: the last Redis reply. By about t=1.5 a PING on the event
subscription has gone unanswered (a lookup that misses the snapshot notices sooner,
after one timeout): the outage starts then, at t=T. While it lasts, the snapshot's
clock stands at t=0, so endpoints live then stay live (no heartbeat can land), and
keys that are not in the snapshot raise RegistryUnavailable at once. From T+60 every
lookup raises RegistryUnavailable and ``ready`` is False. The background tasks retry
with jittered backoff; the first Redis reply ends the outage, and a full reload follows.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from registry.base import KeyNotFound, RegistryError, RegistryUnavailable
from registry.redis_backend import RedisRegistry
from registry.snapshot_state import SnapshotStats
from registry.snapshot_sync import SnapshotSync, await_shared, cancel_and_wait, retrieve_result
from registry.types import CompletionRecord, Heartbeat, HeartbeatResult, ProviderEntry

__all__ = ["SnapshotRegistry", "SnapshotStats"]

logger = logging.getLogger(__name__)


class SnapshotRegistry:
    """Registry that serves lookups from a per-replica snapshot of a RedisRegistry.

    ``start()`` loads the snapshot and starts the background tasks; any method starts
    it on first use otherwise. ``start()`` never raises for an unreachable Redis. The
    instance owns ``inner`` and closes it in ``aclose()``.

    Lookups (``get``, ``by_model``, ``live_models``) make no Redis command when the
    snapshot holds a live answer. On a miss, ``get`` reads the key from Redis (HGET):
    concurrent misses of one key share one read, at most ``max_read_throughs`` reads
    run at once (a lookup waits up to ``timeout_s`` for a slot, then raises
    RegistryUnavailable), and a "not found" is cached for ``negative_ttl_s``. A miss of
    ``by_model`` reloads the whole snapshot (shared by concurrent misses) unless it was
    loaded less than ``negative_ttl_s`` ago. Lookups never return None or an empty list
    while Redis is unreachable; see the module docstring. Writes go to Redis and update
    the snapshot from their result.
    """

    def __init__(
        self,
        inner: RedisRegistry,
        *,
        outage_grace_s: float = 60.0,
        resync_interval_s: float = 30.0,
        negative_ttl_s: float = 1.0,
        timeout_s: float = 0.5,
        health_check_interval_s: float = 1.0,
        max_read_throughs: int = 32,
        max_backoff_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        durations = {
            "outage_grace_s": outage_grace_s,
            "resync_interval_s": resync_interval_s,
            "negative_ttl_s": negative_ttl_s,
            "timeout_s": timeout_s,
            "health_check_interval_s": health_check_interval_s,
            "max_backoff_s": max_backoff_s,
        }
        for name, value in durations.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if max_read_throughs < 1:
            raise ValueError(f"max_read_throughs must be at least 1, got {max_read_throughs}")

        self._sync = SnapshotSync(
            inner,
            outage_grace_s=outage_grace_s,
            resync_interval_s=resync_interval_s,
            timeout_s=timeout_s,
            health_check_interval_s=health_check_interval_s,
            max_backoff_s=max_backoff_s,
            monotonic=monotonic,
        )

        self._inner = inner
        self._state = self._sync.state
        self._clock = self._sync.clock
        self._monotonic = monotonic
        self._negative_ttl_s = negative_ttl_s
        self._timeout_s = timeout_s
        self._read_slots = asyncio.Semaphore(max_read_throughs)
        self._read_throughs: dict[str, asyncio.Task[ProviderEntry | None]] = {}
        self._started = False

    @property
    def inner(self) -> RedisRegistry:
        return self._inner

    @property
    def stats(self) -> SnapshotStats:
        """Lookup and synchronisation counters, for export as Prometheus counters."""
        return self._sync.stats

    @property
    def ready(self) -> bool:
        """True once loaded, while Redis replies or has been unreachable for less than the grace."""
        return self._sync.ready

    def peek(self, pubkey: str) -> ProviderEntry | None:
        """Return the key's live entry as stored in the snapshot now, with no Redis command.

        None when the snapshot has no live endpoint of the key. For tests and debugging:
        unlike ``get``, a miss is not confirmed by Redis.
        """
        now = self._clock.at(self._monotonic())
        return None if now is None else self._state.live(pubkey, now)

    # --- lifetime ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background tasks and load every entry (HGETALL + TIME).

        Returns after one load attempt, which the Redis timeout bounds. When Redis is
        unreachable, the tasks keep retrying and ``ready`` stays False until a load
        succeeds. Calling it again does nothing. Raises RegistryUnavailable after aclose().
        """
        if self._started:
            return
        if self._sync.closed:
            raise RegistryUnavailable("the registry is closed")
        self._started = True
        self._sync.start_tasks()
        try:
            await self._sync.reload(join=True)
        except RegistryError as exc:
            logger.warning("registry snapshot not loaded, retrying in the background: %s", exc)

    async def aclose(self) -> None:
        """Cancel the background tasks and read-throughs, then close the inner registry."""
        if self._sync.closed:
            return
        self._sync.closed = True
        tasks: list[asyncio.Task[Any]] = [
            *self._sync.running_tasks(),
            *self._read_throughs.values(),
        ]
        await cancel_and_wait(tasks, "registry closing")
        self._state.clear()
        await self._inner.aclose()

    # --- lookups ------------------------------------------------------------------------

    async def get(self, pubkey: str) -> ProviderEntry | None:
        """Return the key's live entry; see the class docstring for where it comes from."""
        if not self._started:
            await self.start()
        failure: RegistryUnavailable | None = None
        if self._sync.unreachable_since is None:
            mono = self._monotonic()
            now = self._clock.at(mono)
            if now is not None:
                entry = self._state.live(pubkey, now)
                if entry is not None:
                    self._sync.stats.lookups_snapshot += 1
                    return entry
            if self._state.negative(pubkey, mono):
                self._sync.stats.negative_cache_hits += 1
                return None
            try:
                entry = await self._read_through(pubkey)
            except RegistryUnavailable as exc:
                failure = self._outage_or_raise(exc)
            else:
                self._sync.stats.lookups_redis += 1
                return entry

        entry = self._state.live(pubkey, self._sync.outage_now(failure))
        if entry is None:
            self._sync.stats.lookups_unavailable += 1
            raise RegistryUnavailable(
                f"Redis is unreachable and key {pubkey[:16]}… is not in this replica's snapshot"
            ) from failure
        self._sync.stats.lookups_stale += 1
        return entry

    async def by_model(self, model: str) -> list[ProviderEntry]:
        """Return the live entries serving ``model``, sorted by key."""
        if not self._started:
            await self.start()
        failure: RegistryUnavailable | None = None
        if self._sync.unreachable_since is None:
            mono = self._monotonic()
            now = self._clock.at(mono)
            if now is not None:
                entries = self._state.by_model(model, now)
                if entries:
                    self._sync.stats.lookups_snapshot += 1
                    return entries
                synced_at = self._sync.synced_at
                if synced_at is not None and mono - synced_at < self._negative_ttl_s:
                    self._sync.stats.negative_cache_hits += 1
                    return []
            try:
                now = await self._reload_for_lookup()
            except RegistryUnavailable as exc:
                failure = self._outage_or_raise(exc)
            else:
                self._sync.stats.lookups_redis += 1
                return self._state.by_model(model, now)

        entries = self._state.by_model(model, self._sync.outage_now(failure))
        if not entries:
            self._sync.stats.lookups_unavailable += 1
            raise RegistryUnavailable(
                f"Redis is unreachable and model {model[:100]!r} has no live entry "
                "in this replica's snapshot"
            ) from failure
        self._sync.stats.lookups_stale += 1
        return entries

    async def live_models(self) -> list[str]:
        """Return the sorted names of the models with a live endpoint in the snapshot."""
        if not self._started:
            await self.start()
        failure: RegistryUnavailable | None = None
        if self._sync.unreachable_since is None:
            now = self._clock.at(self._monotonic())
            if now is not None and self._sync.synced_at is not None:
                return self._state.live_models(now)
            try:
                return self._state.live_models(await self._reload_for_lookup())
            except RegistryUnavailable as exc:
                failure = self._outage_or_raise(exc)

        models = self._state.live_models(self._sync.outage_now(failure))
        if not models:
            self._sync.stats.lookups_unavailable += 1
            raise RegistryUnavailable("Redis is unreachable and the snapshot is empty") from failure
        return models

    async def model_last_live(self, model: str) -> float | None:
        """Return the model's last live time from the snapshot; raise during an outage.

        The snapshot loads the models hash with every full reload and follows the
        heartbeat events in between, so no lookup path sends Redis a command per request.
        Before the first load, Redis is read.
        """
        if not self._started:
            await self.start()
        if self._sync.unreachable_since is not None:
            raise RegistryUnavailable("Redis is unreachable")
        if self._sync.synced_at is not None:
            return self._state.model_last_live(model)
        return await self._sync.call(self._inner.model_last_live(model))

    async def entries(self) -> list[ProviderEntry]:
        """Return every entry as stored in Redis (the admin's view, never the snapshot's)."""
        if not self._started:
            await self.start()
        return await self._sync.call(self._inner.entries())

    async def record_completions(
        self, records: Sequence[tuple[str, CompletionRecord]], ttl_s: float
    ) -> None:
        """Write through to Redis: completion records are not part of the snapshot."""
        await self._sync.call(self._inner.record_completions(records, ttl_s))

    async def find_completion(self, chat_id: str) -> CompletionRecord | None:
        return await self._sync.call(self._inner.find_completion(chat_id))

    async def now(self) -> float:
        """Return the estimated registry clock; read Redis ``TIME`` before the first read."""
        if not self._started:
            await self.start()
        now = self._clock.at(self._monotonic())
        if now is not None:
            return now
        now = await self._sync.call(self._inner.now())
        self._clock.sync(now, self._monotonic())
        return now

    async def ping(self) -> None:
        """Send PING to Redis; raise RegistryUnavailable when it does not reply."""
        if not self._started:
            await self.start()
        await self._sync.call(self._inner.ping())

    # --- writes ---------------------------------------------------------------------------

    async def heartbeat(self, beat: Heartbeat) -> HeartbeatResult:
        """Run the heartbeat in Redis, then apply its result to the snapshot at once."""
        if not self._started:
            await self.start()
        result = await self._sync.call(self._inner.heartbeat(beat))
        self._state.apply_heartbeat(beat, result)
        return result

    async def deregister(self, pubkey: str, *, url: str | None, identity: str | None) -> list[str]:
        """Remove endpoints in Redis, then drop them from the snapshot at once."""
        if not self._started:
            await self.start()
        try:
            removed = await self._sync.call(
                self._inner.deregister(pubkey, url=url, identity=identity)
            )
        except KeyNotFound:
            # Redis has no such endpoint: the snapshot must not keep serving it either.
            stored = self._state.stored(pubkey)
            if url is not None:
                self._state.remove_endpoints(pubkey, [url])
            elif stored is not None:
                self._state.remove_endpoints(pubkey, [e.url for e in stored.endpoints])
            raise
        self._state.remove_endpoints(pubkey, removed)
        return removed

    async def reap(self) -> int:
        """Run the reaper in Redis, then drop the ended leases from the snapshot."""
        if not self._started:
            await self.start()
        removed = await self._sync.call(self._inner.reap())
        now = self._clock.at(self._monotonic())
        if now is not None:
            self._state.remove_ended(now)
        return removed

    # --- read-through -----------------------------------------------------------------------

    def _outage_or_raise(self, failure: RegistryUnavailable) -> RegistryUnavailable:
        """Return the failure of a read that started an outage; re-raise any other one.

        A read can fail while Redis is reachable: no free read slot, or the registry closed.
        """
        if self._sync.unreachable_since is None:
            self._sync.stats.lookups_unavailable += 1
            raise failure
        return failure

    async def _read_through(self, pubkey: str) -> ProviderEntry | None:
        """Read one key from Redis, sharing the read with concurrent misses of that key."""
        if self._sync.closed:
            raise RegistryUnavailable("the registry is closed")
        task = self._read_throughs.get(pubkey)
        if task is None:
            task = asyncio.create_task(self._fetch(pubkey), name="registry-read-through")
            self._read_throughs[pubkey] = task
            task.add_done_callback(functools.partial(self._forget_read_through, pubkey))
        else:
            self._sync.stats.coalesced_waits += 1
        return await await_shared(task)

    def _forget_read_through(self, pubkey: str, task: asyncio.Task[ProviderEntry | None]) -> None:
        if self._read_throughs.get(pubkey) is task:
            del self._read_throughs[pubkey]
        retrieve_result(task)

    async def _fetch(self, pubkey: str) -> ProviderEntry | None:
        """Read one key (HGET + TIME), store it in the snapshot and return its live part."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._read_slots.acquire()
        except TimeoutError:
            raise RegistryUnavailable("too many registry reads in flight; retry shortly") from None
        try:
            self._sync.stats.read_throughs += 1
            with self._sync.read_window() as read_seq:
                try:
                    redis_now, stored = await self._inner.read_entry(pubkey)
                except RegistryUnavailable as exc:
                    self._sync.note_failure(exc)
                    raise
                self._sync.note_reply(redis_now)
                installed = self._state.install(pubkey, stored, read_seq)
        finally:
            self._read_slots.release()

        live = stored.live(redis_now) if stored is not None else None
        if live is not None and live.endpoints:
            return live
        if installed:
            self._state.mark_negative(pubkey, self._monotonic() + self._negative_ttl_s)
            return None
        # The key changed while Redis was read (an event or a write): the newer state wins.
        return self._state.live(pubkey, redis_now)

    async def _reload_for_lookup(self) -> float:
        """Reload the snapshot for a lookup that missed it; return the registry time."""
        if self._sync.closed:
            raise RegistryUnavailable("the registry is closed")
        if await self._sync.reload(join=True):
            self._sync.stats.coalesced_waits += 1
        else:
            self._sync.stats.read_throughs += 1
        now = self._clock.at(self._monotonic())
        if now is None:
            raise RegistryUnavailable("Redis is unreachable and nothing was loaded")
        return now
