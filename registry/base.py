"""The registry interface that every backend implements, and the errors it raises."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from registry.types import CompletionRecord, Heartbeat, HeartbeatResult, ProviderEntry

__all__ = [
    "DeregisterForbidden",
    "KeyNotFound",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
]


class RegistryError(Exception):
    """Base class of the errors a registry backend raises."""


class RegistryUnavailable(RegistryError):
    """The registry could not be reached or did not answer within its timeout.

    Backends translate their client library's connection and timeout errors into this
    one class (``raise RegistryUnavailable(...) from exc``), so callers never see them.
    """


class KeyNotFound(RegistryError):
    """A deregistration named a key that has no endpoint at all."""


class DeregisterForbidden(RegistryError):
    """A deregistration named endpoints that the caller does not own; nothing was removed."""


@runtime_checkable
class Registry(Protocol):
    """Store of provider entries keyed by normalised public key.

    Every read filters out endpoints whose ``expires_at`` is at or before the
    registry's clock, so an expired endpoint is dead to callers even before
    ``reap()`` removes it. Every method may raise RegistryUnavailable.

    The owner calls ``start()`` once after creating the registry and ``aclose()`` at
    the end. Lookups raise RegistryUnavailable when the registry is unreachable: they
    never return None or an empty list for that reason.
    """

    @property
    def ready(self) -> bool:
        """True while lookups can be served; reading it makes no I/O (for ``/readyz``)."""
        ...

    async def start(self) -> None:
        """Load state and start background work; return even when the registry is down.

        An unreachable registry does not make it fail: ``ready`` stays False until the
        registry replies.
        """
        ...

    async def heartbeat(self, beat: Heartbeat) -> HeartbeatResult:
        """Register or renew one endpoint atomically and return what happened.

        Conflicts (another live owner of the endpoint, another model for the key, a
        retired instance) are returned as outcomes, not raised, and write nothing.
        """
        ...

    async def deregister(self, pubkey: str, *, url: str | None, identity: str | None) -> list[str]:
        """Remove endpoints of a key and return the URLs removed.

        ``url=None`` means every endpoint of the key that ``identity`` owns.
        ``identity=None`` is the admin: it may remove any endpoint, and with
        ``url=None`` removes them all. When the caller is the owner, the instance ids
        of the removed endpoints are retired for the endpoint's TTL so that late
        heartbeats from that agent instance cannot bring them back.
        Raises KeyNotFound when the key (or the named url of it) has no endpoint and
        DeregisterForbidden when the caller owns none of the named endpoints.
        """
        ...

    async def get(self, pubkey: str) -> ProviderEntry | None:
        """Return the key's entry with live endpoints only, or None when none is live."""
        ...

    async def by_model(self, model: str) -> list[ProviderEntry]:
        """Return the entries serving ``model`` that have at least one live endpoint."""
        ...

    async def entries(self) -> list[ProviderEntry]:
        """Return every entry as stored, expired endpoints included (the admin's view)."""
        ...

    async def live_models(self) -> list[str]:
        """Return the sorted names of the models with at least one live endpoint."""
        ...

    async def model_last_live(self, model: str) -> float | None:
        """Return when a provider of ``model`` was last live, or None if never seen."""
        ...

    async def record_completions(
        self, records: Sequence[tuple[str, CompletionRecord]], ttl_s: float
    ) -> None:
        """Remember which endpoint served each (chat id, record) for ``ttl_s`` seconds.

        Each record is written with its expiry (Redis: SET with PX, all of them in one
        script call), so no record outlives its TTL.
        """
        ...

    async def find_completion(self, chat_id: str) -> CompletionRecord | None:
        """Return the endpoint that served ``chat_id``, or None when unknown or expired."""
        ...

    async def now(self) -> float:
        """Return the registry clock in Unix seconds."""
        ...

    async def reap(self) -> int:
        """Remove the endpoints whose lease has ended and return how many were removed."""
        ...

    async def ping(self) -> None:
        """Return when the registry is reachable; raise RegistryUnavailable otherwise."""
        ...

    async def aclose(self) -> None:
        """Release connections and background tasks. The registry is unusable afterwards."""
        ...
