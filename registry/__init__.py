"""Provider registry: which endpoints serve which model public key, and until when.

Map of the package:

- ``types``: value types (Endpoint, ProviderEntry, Heartbeat, HeartbeatResult) and
  public key normalisation. No I/O.
- ``base``: the ``Registry`` protocol every backend implements, and its errors.
- ``memory``: ``MemoryRegistry``, one process, injectable clock (tests, single replica).
- ``redis_backend``: ``RedisRegistry``, shared by every replica; each write is one Lua
  script from ``lua/`` (heartbeat, deregister, reap) run on the Redis clock.
- ``cli``: the ``e2ee-registry`` admin command (``list``, ``show``).
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
from registry.types import (
    PUBKEY_HEX_LENGTH,
    SIGNING_ALGOS,
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
    "normalize_pubkey",
    "open_registry",
    "redact_url",
    "signing_algo_of",
]

ACCEPTED_SCHEMES = "memory://, redis://, rediss://"

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
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def open_registry(
    url: str,
    *,
    prefix: str = "e2ee",
    timeout_s: float = 0.5,
    clock: Callable[[], float] | None = None,
) -> Registry:
    """Create the registry backend that the URL's scheme names.

    ``memory://`` gives a MemoryRegistry on ``clock`` (default ``time.time``);
    ``redis://`` and ``rediss://`` give a RedisRegistry whose connect and command
    timeouts are ``timeout_s`` seconds and whose keys start with ``prefix``. Redis
    ``TIME`` is that backend's clock, so it ignores ``clock``. No connection is made until
    the first call. Raises ValueError for any other scheme; the message never contains
    the URL's credentials. The caller owns the result and must ``aclose()`` it.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory":
        return MemoryRegistry(clock if clock is not None else time.time)
    if scheme in ("redis", "rediss"):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        try:
            return RedisRegistry.from_url(url, prefix=prefix, timeout_s=timeout_s)
        except ValueError as exc:
            # redis-py's URL errors name the bad part, never the password.
            raise ValueError(f"invalid registry URL {redact_url(url)!r}: {exc}") from exc
    raise ValueError(
        f"unsupported registry URL {redact_url(url)!r}: the scheme must be one of "
        f"{ACCEPTED_SCHEMES}"
    )
