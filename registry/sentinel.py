"""Redis Sentinel URLs: parsing and the client that follows the current master.

Form: ``redis+sentinel://[user:pass@]host:port[,host:port...]/<service>[/<db>]``.

- ``host:port`` pairs name the Sentinels; a pair without a port uses 26379, and an IPv6
  host is written in brackets (``[::1]:26379``).
- ``service`` is the master name that the Sentinels monitor (``sentinel monitor <name>``).
- ``db`` is the database number on the master, 0 when absent.
- ``user:pass`` authenticate to the master (Redis ACL user, or ``:pass`` for
  ``requirepass``); they are percent-decoded. The Sentinels are contacted without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import redis.asyncio
from redis.asyncio.sentinel import Sentinel

__all__ = [
    "SENTINEL_SCHEME",
    "SENTINEL_URL_FORM",
    "SentinelURL",
    "open_sentinel",
    "parse_sentinel_url",
]

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_URL_FORM = "redis+sentinel://[user:pass@]host:port[,host:port...]/<service>[/<db>]"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A parsed Sentinel URL. ``repr`` leaves the password out."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.sentinels:
            raise ValueError("no Sentinel address")
        if not self.service:
            raise ValueError("no service (master) name")
        if self.db < 0:
            raise ValueError(f"the database number must not be negative, got {self.db}")


def _invalid(reason: str) -> ValueError:
    # Messages quote Sentinel addresses and path parts only, never the user info.
    return ValueError(f"{reason}; the accepted form is {SENTINEL_URL_FORM}")


def _parse_address(text: str) -> tuple[str, int]:
    """Parse ``host``, ``host:port`` or ``[v6]:port``."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _invalid(f"invalid Sentinel address {text!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = text.partition(":")
        if ":" in port_text:
            raise _invalid(f"invalid Sentinel address {text!r}: write IPv6 hosts in brackets")
    if not host:
        raise _invalid(f"a Sentinel address has no host: {text!r}")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _invalid(f"invalid port in Sentinel address {text!r}")
    return host, int(port_text)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a ``redis+sentinel://`` URL; raise ValueError naming the accepted form.

    The error messages quote host addresses and path parts, never the user info.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() != SENTINEL_SCHEME:
        raise _invalid(f"the scheme must be {SENTINEL_SCHEME}://")
    if "?" in rest or "#" in rest:
        raise _invalid("query strings and fragments are not supported")

    # 1. User info, then the comma-separated Sentinel addresses.
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts = netloc
    if not hosts:
        raise _invalid("no Sentinel address")
    sentinels = tuple(_parse_address(part.strip()) for part in hosts.split(","))
    username: str | None = None
    password: str | None = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon and password_text else None

    # 2. The service name and the optional database number.
    segments = path.split("/")
    if segments and segments[-1] == "":
        segments.pop()
    if not segments or not segments[0]:
        raise _invalid("no service (master) name after the addresses")
    if len(segments) > 2:
        raise _invalid(f"too many path parts: /{'/'.join(segments)}")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise _invalid(f"the database must be a number, got {segments[1]!r}")
        db = int(segments[1])
    return SentinelURL(sentinels, unquote(segments[0]), db, username, password)


def open_sentinel(
    parsed: SentinelURL, *, timeout_s: float, **connection_kwargs: Any
) -> tuple[Sentinel, redis.asyncio.Redis]:
    """Create the Sentinel manager and a client of its current master.

    ``timeout_s`` bounds connecting and each command, towards both the Sentinels and the
    master. After a failover the client asks the Sentinels again on its next connection,
    so writes reach the promoted replica without a restart. The caller owns both objects
    and closes the client and then the manager.
    """
    sentinel = Sentinel(
        list(parsed.sentinels),
        sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s},
    )
    client: redis.asyncio.Redis = sentinel.master_for(
        parsed.service,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        **connection_kwargs,
    )
    return sentinel, client
