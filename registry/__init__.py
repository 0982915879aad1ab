"""Provider registry: which endpoints serve which model public key, and until when.

Map of the package:

- ``types``: value types (Endpoint, ProviderEntry, Heartbeat, HeartbeatResult) and
  public key normalisation. No I/O.
- ``base``: the ``Registry`` protocol every backend implements, and its errors.
- ``memory``: ``MemoryRegistry``, one process, injectable clock (tests, single replica).
- ``redis_backend``: ``RedisRegistry``, shared by every replica; each write is one Lua
  script from ``lua/`` (heartbeat, deregister, reap) run on the Redis clock.
- ``redis_io``: translation of redis-py errors, and the events channel subscription.
- ``sentinel``: ``redis+sentinel://`` URLs and the client that follows the master.
- ``snapshot``: ``SnapshotRegistry``, the per-replica copy of a RedisRegistry that
  serves lookups from memory; ``snapshot_state`` (no I/O) and ``snapshot_sync``
  (background tasks, outage tracking) are its parts.
- ``cli`` and ``admin_client``: the ``e2ee-registry`` admin command, against Redis or a
  gateway's admin API.
- ``open_registry(url)`` here picks the backend by URL scheme.

Glossary:

key
    A provider's normalised model public key: 64 hex characters (ed25519) or 128
    (ecdsa, secp256k1 without the ``04`` prefix). Requests pinned to a key go only to
    that key's endpoints.
endpoint
    One provider base URL serving a key, owned by the identity of the provider token
    that first registered it. Several endpoints may share a key (replicas).
heartbeat
    The write that registers an endpoint or renews its lease.
ttl_s
    Lease length in seconds that a heartbeat requests. The caller clamps it.
expires_at
    Unix time (registry clock) at which the lease ends: ``last_heartbeat + ttl_s``.
lease
    An endpoint's live period. Timeline with ``ttl_s = 30``: a heartbeat at t=0 sets
    expires_at=30; heartbeats at t=10 and t=20 move it to 40 and 50. If they stop, the
    endpoint is dead for every reader at t=50 (``expires_at <= now``), before the
    reaper removes it, and from then on another identity may take the URL over.
reaper
    The periodic ``reap()`` call that deletes ended leases and publishes ``expire``.
snapshot
    One gateway replica's in-memory copy of the Redis registry, kept current by the
    events channel and a periodic full reload.
read-through
    A Redis read made by a lookup that the snapshot could not answer positively.
outage grace
    How long a replica keeps serving its snapshot while Redis is unreachable.
instance_id
    A random id per heartbeat agent process. When the owner deregisters an endpoint,
    that endpoint is retired for its instance_id for one lease length: heartbeats for
    it still in flight from that process get RETIRED instead of registering it again.
    The same process may still register other endpoints, such as a rotated key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from registry.base import (
    DeregisterForbidden,
    KeyNotFound,
    Registry,
    RegistryError,
    RegistryUnavailable,
)
from registry.memory import MemoryRegistry
from registry.redis_backend import RedisRegistry
from registry.sentinel import SENTINEL_URL_FORM
from registry.snapshot import SnapshotRegistry, SnapshotStats
from registry.types import (
    PUBKEY_HEX_LENGTH,
    SIGNING_ALGOS,
    CompletionRecord,
    Endpoint,
    Heartbeat,
    HeartbeatOutcome,
    HeartbeatResult,
    InvalidPublicKey,
    ProviderEntry,
    normalize_pubkey,
    signing_algo_of,
)

__all__ = [
    "PUBKEY_HEX_LENGTH",
    "SIGNING_ALGOS",
    "CompletionRecord",
    "DeregisterForbidden",
    "Endpoint",
    "Heartbeat",
    "HeartbeatOutcome",
    "HeartbeatResult",
    "InvalidPublicKey",
    "KeyNotFound",
    "MemoryRegistry",
    "ProviderEntry",
    "RedisRegistry",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "SnapshotRegistry",
    "SnapshotStats",
    "normalize_pubkey",
    "open_registry",
    "redact_url",
    "signing_algo_of",
]

ACCEPTED_SCHEMES = "memory://, redis://, rediss://, redis+sentinel://"
REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+sentinel"})

_SECRET_QUERY_PARAMS = frozenset({"password", "username", "user"})


def redact_url(url: str) -> str:
    """Return ``url`` with its ``user:pass@`` part and password query values masked.

    The result is meant for logs and error messages; it cannot be used to connect.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        # An unparsable URL may still contain a password: show only what precedes "://".
        scheme, sep, _ = url.partition("://")
        return f"{scheme}://<unparsable>" if sep else "<unparsable URL>"

    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() in _SECRET_QUERY_PARAMS else v) for k, v in pairs],
            safe="*",
        )
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to mask; urlunsplit would turn memory:// into memory:
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def open_registry(
    url: str,
    *,
    prefix: str = "e2ee",
    timeout_s: float = 0.5,
    clock: Callable[[], float] | None = None,
    snapshot: bool = True,
    outage_grace_s: float = 60.0,
) -> Registry:
    """Create the registry that the URL's scheme names.

    ``memory://`` gives a MemoryRegistry on ``clock`` (default ``time.time``).
    ``redis://``, ``rediss://`` and ``redis+sentinel://`` (form: SENTINEL_URL_FORM) give
    a SnapshotRegistry over a RedisRegistry, or the RedisRegistry alone with
    ``snapshot=False``. Redis connect and command timeouts are ``timeout_s`` seconds, keys
    start with ``prefix``, and a snapshot serves its entries for ``outage_grace_s``
    seconds while Redis is unreachable. Redis ``TIME`` is the clock there, so ``clock``
    is ignored. No connection is made here: the caller awaits ``start()`` (a snapshot
    also starts on its first call) and owns the result, so it must ``aclose()`` it.
    Raises ValueError for any other scheme or a malformed URL; the message never
    contains the URL's credentials.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory":
        return MemoryRegistry(clock if clock is not None else time.time)
    if scheme in REDIS_SCHEMES:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if outage_grace_s <= 0:
            raise ValueError(f"outage_grace_s must be positive, got {outage_grace_s}")
        try:
            inner = RedisRegistry.from_url(url, prefix=prefix, timeout_s=timeout_s)
        except ValueError as exc:
            # redis-py's and the Sentinel parser's messages name the bad part, never the
            # password.
            raise ValueError(f"invalid registry URL {redact_url(url)!r}: {exc}") from exc
        if not snapshot:
            return inner
        return SnapshotRegistry(inner, outage_grace_s=outage_grace_s, timeout_s=timeout_s)
    raise ValueError(
        f"unsupported registry URL {redact_url(url)!r}: the scheme must be one of "
        f"{ACCEPTED_SCHEMES} ({SENTINEL_URL_FORM})"
    )
