"""Client API keys, the per-key concurrency cap and the limit on failed token attempts.

Client keys are stored as SHA-256 hex digests (``GATEWAY_CLIENT_KEYS_FILE``: lines of
``<name> <sha256 hex>``), so the file does not contain a usable secret. A client sends
its key as ``Authorization: Bearer <key>``; the gateway hashes it and looks the digest
up. The client's Authorization header never reaches a provider.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from proxy.auth import TokenFileError
from proxy.errors import ConcurrencyLimited, TooManyFailedAuth

__all__ = ["ConcurrencyLimiter", "FailedAuthLimiter", "hash_client_key", "load_client_keys"]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def hash_client_key(key: str) -> str:
    """Return the digest stored in the client keys file for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_client_keys(path: str) -> dict[str, str]:
    """Read ``<name> <sha256 hex>`` lines and return {digest: name}.

    Raises TokenFileError, naming the file and line, for a malformed line, a digest that
    is not 64 hex characters, or a duplicate name or digest.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenFileError(f"cannot read {path}: {exc.strerror}") from exc
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or _SHA256_HEX.fullmatch(fields[1].lower()) is None:
            raise TokenFileError(
                f"{path}:{number}: expected '<name> <sha256 hex of the key>'; "
                "compute the digest with: printf %s KEY | sha256sum"
            )
        name, digest = fields[0], fields[1].lower()
        if digest in keys or name in keys.values():
            raise TokenFileError(f"{path}:{number}: name or digest appears twice")
        keys[digest] = name
    return keys


class ConcurrencyLimiter:
    """Caps the requests in flight per client; over the cap raises ConcurrencyLimited."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._in_flight: dict[str, int] = {}

    @contextmanager
    def slot(self, client: str) -> Iterator[None]:
        current = self._in_flight.get(client, 0)
        if current >= self._cap:
            raise ConcurrencyLimited(
                f"This API key already has {current} requests in flight, the limit. "
                "Retry when one of them has finished.",
                retry_after_s=1,
            )
        self._in_flight[client] = current + 1
        try:
            yield
        finally:
            left = self._in_flight[client] - 1
            if left:
                self._in_flight[client] = left
            else:
                del self._in_flight[client]


class FailedAuthLimiter:
    """Counts failed token attempts per source IP in a sliding window."""

    def __init__(
        self,
        limit: int,
        window_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = 100_000,
    ) -> None:
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._max_sources = max_sources
        self._failures: dict[str, deque[float]] = {}

    def check(self, source: str | None) -> None:
        """Raise TooManyFailedAuth when ``source`` reached the limit within the window."""
        failures = self._recent(source)
        if failures is not None and len(failures) >= self._limit:
            retry_after = max(1, int(failures[0] + self._window_s - self._clock()) + 1)
            raise TooManyFailedAuth(
                f"Too many failed token attempts from this address. Retry in {retry_after} s "
                "with a valid token.",
                retry_after_s=retry_after,
            )

    def record_failure(self, source: str | None) -> None:
        key = source or "unknown"
        if key not in self._failures and len(self._failures) >= self._max_sources:
            self._failures.clear()
        self._failures.setdefault(key, deque()).append(self._clock())

    def _recent(self, source: str | None) -> deque[float] | None:
        failures = self._failures.get(source or "unknown")
        if failures is None:
            return None
        cutoff = self._clock() - self._window_s
        while failures and failures[0] <= cutoff:
            failures.popleft()
        if not failures:
            del self._failures[source or "unknown"]
            return None
        return failures
