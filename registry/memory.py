"""One-process registry backend with the Redis backend's semantics.

Every method runs without awaiting anything, so each call is atomic on the event loop
that owns the registry. State lives in this process only: replicas of the gateway do
not see each other's registrations, and a restart forgets every provider.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from registry.base import DeregisterForbidden, KeyNotFound
from registry.types import (
    CompletionRecord,
    Endpoint,
    Heartbeat,
    HeartbeatOutcome,
    HeartbeatResult,
    ProviderEntry,
)

__all__ = ["MemoryRegistry"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODELS = 10_000
DEFAULT_MAX_COMPLETIONS = 100_000
"""Completion records kept at most; past it the oldest is dropped before its TTL ends."""
"""How many models the "last live" map keeps before it forgets the stalest one."""


@dataclass(slots=True)
class _StoredEntry:
    """Mutable provider entry, in the shape of the Redis hash value."""

    model: str
    signing_algo: str
    endpoints: dict[str, Endpoint] = field(default_factory=dict)

    def freeze(self, pubkey: str) -> ProviderEntry:
        ordered = tuple(self.endpoints[url] for url in sorted(self.endpoints))
        return ProviderEntry(pubkey, self.model, self.signing_algo, ordered)


class MemoryRegistry:
    """Registry kept in this process's memory, with an injectable clock.

    ``clock`` returns Unix seconds; tests pass a fake one and advance it instead of
    sleeping. ``max_models`` bounds the "models last live" map: past it, the model
    seen longest ago is forgotten. An endpoint retired for an instance id stays retired
    for one lease length; ``reap()`` purges the marks that ended.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        max_models: int = DEFAULT_MAX_MODELS,
    ) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self._clock = clock
        self._max_models = max_models
        self._providers: dict[str, _StoredEntry] = {}
        self._models_last_live: dict[str, float] = {}
        # (instance_id, pubkey, url) -> Unix time until which that instance may not
        # register that endpoint again.
        self._retired_until: dict[tuple[str, str, str], float] = {}
        # chat id -> (record, Unix time it expires), oldest first.
        self._completions: OrderedDict[str, tuple[CompletionRecord, float]] = OrderedDict()

    @property
    def ready(self) -> bool:
        """Always True: memory is always reachable."""
        return True

    async def start(self) -> None:
        """Return at once: there is nothing to load."""

    async def heartbeat(self, beat: Heartbeat) -> HeartbeatResult:
        """Register or renew one endpoint; see ``Registry.heartbeat``."""
        now = self._clock()
        retired_mark = (beat.instance_id, beat.pubkey, beat.url)
        if beat.instance_id and self._retired_until.get(retired_mark, 0.0) > now:
            return HeartbeatResult(HeartbeatOutcome.RETIRED)

        # Ended leases are ignored here, so an expired owner or model binding blocks nothing.
        stored = self._providers.get(beat.pubkey)
        live = {u: e for u, e in stored.endpoints.items() if e.is_live(now)} if stored else {}
        current = live.get(beat.url)
        if current is not None and current.owner != beat.owner:
            return HeartbeatResult(HeartbeatOutcome.OWNER_CONFLICT)
        if stored is not None and live and stored.model != beat.model:
            return HeartbeatResult(HeartbeatOutcome.MODEL_CONFLICT, bound_model=stored.model)

        # Upsert: registered_at survives a refresh of a live endpoint.
        if stored is None or not live:
            stored = _StoredEntry(beat.model, beat.signing_algo)
        else:
            stored.endpoints = live
        expires_at = now + beat.ttl_s
        stored.endpoints[beat.url] = Endpoint(
            url=beat.url,
            owner=beat.owner,
            instance_id=beat.instance_id,
            registered_at=current.registered_at if current is not None else now,
            last_heartbeat=now,
            expires_at=expires_at,
        )
        self._providers[beat.pubkey] = stored
        self._note_model_live(beat.model, now)

        outcome = HeartbeatOutcome.REFRESHED if current is not None else HeartbeatOutcome.REGISTERED
        return HeartbeatResult(outcome, expires_at=expires_at)

    async def deregister(self, pubkey: str, *, url: str | None, identity: str | None) -> list[str]:
        """Remove endpoints of a key; see ``Registry.deregister``."""
        stored = self._providers.get(pubkey)
        if stored is None or not stored.endpoints:
            raise KeyNotFound(f"no endpoint registered for key {pubkey[:16]}…")

        # Leases that already ended count as endpoints until the reaper removes them.
        if url is not None:
            endpoint = stored.endpoints.get(url)
            if endpoint is None:
                raise KeyNotFound(f"key {pubkey[:16]}… has no endpoint {url}")
            if identity is not None and endpoint.owner != identity:
                raise DeregisterForbidden(f"endpoint {url} belongs to another identity")
            targets = [url]
        else:
            targets = sorted(
                u for u, e in stored.endpoints.items() if identity is None or e.owner == identity
            )
            if not targets:
                raise DeregisterForbidden(f"identity owns no endpoint of key {pubkey[:16]}…")

        now = self._clock()
        for target in targets:
            endpoint = stored.endpoints.pop(target)
            if identity is not None and endpoint.instance_id:
                lease_s = endpoint.expires_at - endpoint.last_heartbeat
                mark = (endpoint.instance_id, pubkey, target)
                self._retired_until[mark] = now + max(lease_s, 0.001)
        if not stored.endpoints:
            del self._providers[pubkey]
        return targets

    async def get(self, pubkey: str) -> ProviderEntry | None:
        """Return the key's entry with live endpoints only, or None."""
        stored = self._providers.get(pubkey)
        if stored is None:
            return None
        entry = stored.freeze(pubkey).live(self._clock())
        return entry if entry.endpoints else None

    async def by_model(self, model: str) -> list[ProviderEntry]:
        """Return the live entries serving ``model``, sorted by key."""
        return [e for e in self._live_entries() if e.model == model]

    async def entries(self) -> list[ProviderEntry]:
        """Return every stored entry, expired endpoints included, sorted by key."""
        return [self._providers[k].freeze(k) for k in sorted(self._providers)]

    async def live_models(self) -> list[str]:
        """Return the sorted names of models with at least one live endpoint."""
        return sorted({e.model for e in self._live_entries()})

    async def model_last_live(self, model: str) -> float | None:
        """Return the time of the last heartbeat for ``model``, or None if never seen."""
        return self._models_last_live.get(model)

    async def record_completions(
        self, records: Sequence[tuple[str, CompletionRecord]], ttl_s: float
    ) -> None:
        """Remember completion endpoints; past DEFAULT_MAX_COMPLETIONS the oldest go."""
        expires_at = self._clock() + ttl_s
        for chat_id, record in records:
            self._completions[chat_id] = (record, expires_at)
            self._completions.move_to_end(chat_id)
        while len(self._completions) > DEFAULT_MAX_COMPLETIONS:
            self._completions.popitem(last=False)

    async def find_completion(self, chat_id: str) -> CompletionRecord | None:
        stored = self._completions.get(chat_id)
        if stored is None:
            return None
        record, expires_at = stored
        if expires_at <= self._clock():
            del self._completions[chat_id]
            return None
        return record

    async def now(self) -> float:
        """Return the injected clock's time in Unix seconds."""
        return self._clock()

    async def reap(self) -> int:
        """Remove ended leases and retired-instance marks; return the endpoints removed."""
        now = self._clock()
        removed = 0
        for pubkey in list(self._providers):
            stored = self._providers[pubkey]
            ended = [u for u, e in stored.endpoints.items() if not e.is_live(now)]
            for url in ended:
                del stored.endpoints[url]
                logger.info("provider endpoint expired: key=%s… url=%s", pubkey[:16], url)
            removed += len(ended)
            if not stored.endpoints:
                del self._providers[pubkey]

        for mark in [m for m, until in self._retired_until.items() if until <= now]:
            del self._retired_until[mark]
        return removed

    async def ping(self) -> None:
        """Return at once: memory is always reachable."""

    async def aclose(self) -> None:
        """Forget every entry."""
        self._providers.clear()
        self._models_last_live.clear()
        self._retired_until.clear()

    def _live_entries(self) -> list[ProviderEntry]:
        now = self._clock()
        live = (self._providers[k].freeze(k).live(now) for k in sorted(self._providers))
        return [e for e in live if e.endpoints]

    def _note_model_live(self, model: str, now: float) -> None:
        self._models_last_live[model] = now
        if len(self._models_last_live) > self._max_models:
            stalest = min(self._models_last_live, key=self._models_last_live.__getitem__)
            del self._models_last_live[stalest]
