"""Provider choice: least outstanding requests with a random tie-break, passive ejection.

No I/O here. ``Balancer`` keeps, per endpoint URL, the number of requests in flight and
the monotonic time until which a failing endpoint stays out of unpinned balancing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from registry.types import ProviderEntry

__all__ = ["Balancer", "Target", "targets_for_key", "targets_for_model"]


@dataclass(frozen=True, slots=True)
class Target:
    """One endpoint a request can be sent to: a provider base URL and the key it holds."""

    url: str
    pubkey: str


def targets_for_key(entry: ProviderEntry | None, model: str) -> list[Target]:
    """Return the endpoints of a pinned key that serve ``model`` (none on a mismatch)."""
    if entry is None or entry.model != model:
        return []
    return [Target(endpoint.url, entry.pubkey) for endpoint in entry.endpoints]


def targets_for_model(
    entries: Sequence[ProviderEntry], signing_algo: str | None = None
) -> list[Target]:
    """Return every endpoint of the given entries, optionally of one signing algorithm."""
    return [
        Target(endpoint.url, entry.pubkey)
        for entry in entries
        if signing_algo is None or entry.signing_algo == signing_algo
        for endpoint in entry.endpoints
    ]


class Balancer:
    """Chooses endpoints and tracks their load and failures across requests."""

    def __init__(
        self,
        cooldown_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._in_flight: dict[str, int] = {}
        self._ejected_until: dict[str, float] = {}

    def choose(self, targets: Sequence[Target], *, tried: Collection[Target] = ()) -> Target:
        """Return the least loaded target, preferring untried and non-ejected ones.

        Falls back to tried or ejected targets rather than choosing nothing, so a
        pinned key with one endpoint is retried on that endpoint.
        """
        if not targets:
            raise ValueError("no targets to choose from")
        now = self._clock()
        pool = [t for t in targets if t not in tried] or list(targets)
        healthy = [t for t in pool if self._ejected_until.get(t.url, 0.0) <= now]
        pool = healthy or pool

        least = min(self._in_flight.get(t.url, 0) for t in pool)
        candidates = [t for t in pool if self._in_flight.get(t.url, 0) == least]
        return candidates[0] if len(candidates) == 1 else self._rng.choice(candidates)

    def started(self, target: Target) -> None:
        self._in_flight[target.url] = self._in_flight.get(target.url, 0) + 1

    def finished(self, target: Target) -> None:
        left = self._in_flight.get(target.url, 0) - 1
        if left > 0:
            self._in_flight[target.url] = left
        else:
            self._in_flight.pop(target.url, None)

    def failed(self, target: Target) -> None:
        """Eject the target from balancing for the cool-down period."""
        self._ejected_until[target.url] = self._clock() + self._cooldown_s

    def succeeded(self, target: Target) -> None:
        self._ejected_until.pop(target.url, None)

    def in_flight(self, url: str) -> int:
        return self._in_flight.get(url, 0)

    def is_ejected(self, url: str) -> bool:
        return self._ejected_until.get(url, 0.0) > self._clock()
