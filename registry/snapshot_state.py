"""In-memory state of the per-replica snapshot: entries, Redis clock estimate, counters.

No I/O here: ``registry.snapshot`` reads Redis and feeds the results in. Three rules keep
the state from going back in time when replies arrive out of order:

- Every change that this replica learns outside a read (an event, its own write)
  ``touch``-es the key, which bumps a sequence number.
- A read notes the sequence number when it starts (``seq``). Its result for a key is
  installed only if the key was not touched since, and ``install`` returns False
  otherwise. The touch that won has already queued a re-read of the key, or is newer
  than the read.
- A touch also drops the key's negative-cache mark, so a registration seen by event is
  never hidden by an earlier "not found".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from registry.types import Endpoint, Heartbeat, HeartbeatOutcome, HeartbeatResult, ProviderEntry

__all__ = ["RegistryClock", "SnapshotState", "SnapshotStats"]

DEFAULT_MAX_NEGATIVE = 10_000


@dataclass(slots=True)
class SnapshotStats:
    """Counters of one snapshot since it was created; they only grow.

    The gateway exports each as a Prometheus counter.
    """

    lookups_snapshot: int = 0
    """Lookups served from the snapshot without a Redis command."""
    lookups_redis: int = 0
    """Lookups served by a read-through (their own or one they joined)."""
    lookups_stale: int = 0
    """Lookups served from the snapshot while Redis was unreachable."""
    lookups_unavailable: int = 0
    """Lookups that raised RegistryUnavailable."""
    read_throughs: int = 0
    """Redis reads made for lookups that missed the snapshot, after coalescing."""
    coalesced_waits: int = 0
    """Lookups that waited for a read-through another lookup had started."""
    negative_cache_hits: int = 0
    """Misses served by a recent "not found" from Redis, without a Redis command."""
    redis_errors: int = 0
    """Redis calls that failed because Redis was unreachable or too slow."""
    resyncs: int = 0
    """Full reloads (HGETALL) that completed."""
    subscriber_reconnects: int = 0
    """Subscriptions to the events channel made after the first one."""
    events_applied: int = 0
    """Events-channel messages applied to the snapshot."""


class RegistryClock:
    """Estimate of Redis ``TIME`` between reads, from the local monotonic clock.

    ``sync`` takes a Redis time and the monotonic time at which its reply arrived, so
    the estimate runs at most one round trip behind Redis: an endpoint may look live
    for that long after its expires_at, never dead before it.
    """

    __slots__ = ("_mono_at_sync", "_redis_at_sync")

    def __init__(self) -> None:
        self._redis_at_sync: float | None = None
        self._mono_at_sync = 0.0

    def sync(self, redis_time: float, mono: float) -> None:
        self._redis_at_sync = redis_time
        self._mono_at_sync = mono

    def at(self, mono: float) -> float | None:
        """Return the estimated Redis time at monotonic time ``mono``; None before a sync."""
        if self._redis_at_sync is None:
            return None
        return self._redis_at_sync + (mono - self._mono_at_sync)


def _live(entry: ProviderEntry | None, now: float) -> ProviderEntry | None:
    if entry is None:
        return None
    live = entry.live(now)
    return live if live.endpoints else None


class SnapshotState:
    """Entries keyed by public key, an index by model and a negative cache.

    Entries are kept as stored in Redis, endpoints past their expires_at included; the
    readers filter with the time they pass in. ``max_negative`` bounds the negative
    cache: past it, the oldest mark is dropped.
    """

    def __init__(self, *, max_negative: int = DEFAULT_MAX_NEGATIVE) -> None:
        self._entries: dict[str, ProviderEntry] = {}
        self._keys_by_model: dict[str, set[str]] = {}
        self._seq = 0
        self._touched: dict[str, int] = {}
        self._negative_until: dict[str, float] = {}
        self._max_negative = max_negative
        self._models_last_live: dict[str, float] = {}

    @property
    def seq(self) -> int:
        """Sequence number of the last touch; a read notes it when it starts."""
        return self._seq

    def __len__(self) -> int:
        return len(self._entries)

    # --- reads ---------------------------------------------------------------------

    def stored(self, pubkey: str) -> ProviderEntry | None:
        return self._entries.get(pubkey)

    def live(self, pubkey: str, now: float) -> ProviderEntry | None:
        """Return the key's entry with its live endpoints, or None when none is live."""
        return _live(self._entries.get(pubkey), now)

    def by_model(self, model: str, now: float) -> list[ProviderEntry]:
        """Return the live entries serving ``model``, sorted by key."""
        keys = self._keys_by_model.get(model, ())
        live = (_live(self._entries[k], now) for k in sorted(keys))
        return [e for e in live if e is not None]

    def live_models(self, now: float) -> list[str]:
        return sorted(
            model
            for model, keys in self._keys_by_model.items()
            if any(_live(self._entries[k], now) is not None for k in keys)
        )

    def model_last_live(self, model: str) -> float | None:
        """Return when a provider of ``model`` was last live (registry time), if known."""
        return self._models_last_live.get(model)

    def note_model_live(self, model: str, when: float) -> None:
        """Record a heartbeat for ``model`` at registry time ``when``; earlier ones are kept."""
        if when > self._models_last_live.get(model, 0.0):
            self._models_last_live[model] = when

    def merge_models(self, models_last_live: dict[str, float]) -> None:
        """Merge a full read of the models hash; the later time of each model wins."""
        for model, when in models_last_live.items():
            self.note_model_live(model, when)

    # --- negative cache -------------------------------------------------------------

    def negative(self, pubkey: str, mono: float) -> bool:
        """Return whether Redis returned "no live endpoint" for the key less than a TTL ago."""
        until = self._negative_until.get(pubkey)
        if until is None:
            return False
        if until > mono:
            return True
        del self._negative_until[pubkey]
        return False

    def mark_negative(self, pubkey: str, until_mono: float) -> None:
        self._negative_until.pop(pubkey, None)
        if len(self._negative_until) >= self._max_negative:
            del self._negative_until[next(iter(self._negative_until))]
        self._negative_until[pubkey] = until_mono

    # --- changes ----------------------------------------------------------------------

    def touch(self, pubkey: str) -> None:
        """Record a change to the key learnt outside a read; see the module docstring."""
        self._seq += 1
        self._touched[pubkey] = self._seq
        self._negative_until.pop(pubkey, None)

    def install(self, pubkey: str, entry: ProviderEntry | None, read_seq: int) -> bool:
        """Store a read's result for the key unless the key was touched after ``read_seq``."""
        if self._touched.get(pubkey, 0) > read_seq:
            return False
        self._put(pubkey, entry)
        return True

    def replace_all(self, entries: Iterable[ProviderEntry], read_seq: int) -> None:
        """Replace every entry with a full read, except the keys touched after ``read_seq``."""
        fresh = {e.pubkey: e for e in entries}
        for pubkey in [k for k in self._entries if k not in fresh]:
            self.install(pubkey, None, read_seq)
        for pubkey, entry in fresh.items():
            self.install(pubkey, entry, read_seq)

    def clear(self) -> None:
        """Forget every entry, touch and negative mark."""
        self._entries.clear()
        self._keys_by_model.clear()
        self._touched.clear()
        self._negative_until.clear()
        self._models_last_live.clear()

    def forget_touches(self, up_to_seq: int) -> None:
        """Drop touch records at or below ``up_to_seq``: no read that started earlier is left."""
        self._touched = {k: s for k, s in self._touched.items() if s > up_to_seq}

    def apply_heartbeat(self, beat: Heartbeat, result: HeartbeatResult) -> None:
        """Apply this replica's own successful heartbeat the way the heartbeat script did.

        The script's clock reading is recovered as ``expires_at - ttl_s``; it may differ
        from the stored ``last_heartbeat`` by a millisecond until the key is read again.
        """
        if result.outcome not in (HeartbeatOutcome.REGISTERED, HeartbeatOutcome.REFRESHED):
            return
        self.touch(beat.pubkey)
        now = result.expires_at - beat.ttl_s
        current = self.live(beat.pubkey, now)
        if current is None or current.model != beat.model:
            current = ProviderEntry(beat.pubkey, beat.model, beat.signing_algo, ())
        previous = next((e for e in current.endpoints if e.url == beat.url), None)
        renewed = Endpoint(
            url=beat.url,
            owner=beat.owner,
            instance_id=beat.instance_id,
            registered_at=previous.registered_at if previous is not None else now,
            last_heartbeat=now,
            expires_at=result.expires_at,
        )
        others = [e for e in current.endpoints if e.url != beat.url]
        endpoints = tuple(sorted([*others, renewed], key=lambda e: e.url))
        self._put(beat.pubkey, ProviderEntry(beat.pubkey, beat.model, beat.signing_algo, endpoints))
        self.note_model_live(beat.model, now)

    def remove_endpoints(self, pubkey: str, urls: Iterable[str]) -> None:
        """Touch the key and drop the named endpoints (a deregistration or an expiry)."""
        self.touch(pubkey)
        entry = self._entries.get(pubkey)
        if entry is None:
            return
        removed_urls = set(urls)
        remaining = tuple(e for e in entry.endpoints if e.url not in removed_urls)
        if len(remaining) != len(entry.endpoints):
            self._put(pubkey, ProviderEntry(pubkey, entry.model, entry.signing_algo, remaining))

    def remove_ended(self, now: float) -> None:
        """Drop the endpoints whose lease ended at or before ``now``, as the reaper did."""
        for pubkey in list(self._entries):
            entry = self._entries[pubkey]
            live = entry.live(now)
            if live is not entry:
                self._put(pubkey, live)

    def _put(self, pubkey: str, entry: ProviderEntry | None) -> None:
        new = entry if entry is not None and entry.endpoints else None
        old = self._entries.get(pubkey)
        if old is not None and (new is None or new.model != old.model):
            keys = self._keys_by_model.get(old.model)
            if keys is not None:
                keys.discard(pubkey)
                if not keys:
                    del self._keys_by_model[old.model]
        if new is None:
            self._entries.pop(pubkey, None)
            return
        self._entries[pubkey] = new
        self._keys_by_model.setdefault(new.model, set()).add(pubkey)
