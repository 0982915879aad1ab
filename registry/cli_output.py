"""Text and JSON output of the ``e2ee-registry`` command.

JSON entries have the shape of the Redis hash value (``redis-cli HGET e2ee:providers
<key>``) plus the public key and each endpoint's ``seconds_left``. Text output shows
keys by their first 16 hex characters, except ``show``, which prints the whole key.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from registry.redis_io import RegistryEvent
from registry.types import ProviderEntry

__all__ = [
    "KEY_PREFIX_CHARS",
    "entry_to_json",
    "event_to_json",
    "format_entry",
    "format_event",
    "format_table",
    "short_key",
    "write_json",
    "write_json_line",
]

KEY_PREFIX_CHARS = 16


def short_key(pubkey: str) -> str:
    return pubkey[:KEY_PREFIX_CHARS] + "…"


def _seconds_left(expires_at: float, now: float) -> str:
    left = expires_at - now
    return f"{left:.1f}" if left > 0 else f"{left:.1f} (expired)"


def _timestamp(unix_s: float) -> str:
    iso = datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="milliseconds")
    return f"{iso.replace('+00:00', 'Z')} ({unix_s:.3f})"


def entry_to_json(entry: ProviderEntry, now: float) -> dict[str, Any]:
    """Return an entry in the shape of its Redis hash value, plus the seconds left."""
    return {
        "pubkey": entry.pubkey,
        "model": entry.model,
        "signing_algo": entry.signing_algo,
        "endpoints": {
            e.url: {
                "owner": e.owner,
                "instance_id": e.instance_id,
                "registered_at": e.registered_at,
                "last_heartbeat": e.last_heartbeat,
                "expires_at": e.expires_at,
                "seconds_left": round(e.expires_at - now, 3),
            }
            for e in entry.endpoints
        },
    }


def write_json(document: object, out: TextIO) -> None:
    out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")


def write_json_line(document: object, out: TextIO) -> None:
    out.write(orjson.dumps(document).decode() + "\n")


def format_table(entries: Sequence[ProviderEntry], now: float) -> str:
    """Return one aligned row per endpoint, headed by the column names."""
    rows = [("KEY", "MODEL", "ALGO", "URL", "OWNER", "SECONDS_LEFT")]
    for entry in entries:
        for endpoint in entry.endpoints:
            rows.append(
                (
                    short_key(entry.pubkey),
                    entry.model,
                    entry.signing_algo,
                    endpoint.url,
                    endpoint.owner,
                    _seconds_left(endpoint.expires_at, now),
                )
            )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def format_entry(entry: ProviderEntry, now: float) -> str:
    """Return every field of an entry, one per line, endpoints indented below it."""
    lines = [
        f"key           {entry.pubkey}",
        f"model         {entry.model}",
        f"signing_algo  {entry.signing_algo}",
        f"endpoints     {len(entry.endpoints)}",
    ]
    for endpoint in entry.endpoints:
        lines += [
            "",
            f"  url             {endpoint.url}",
            f"  owner           {endpoint.owner}",
            f"  instance_id     {endpoint.instance_id or '-'}",
            f"  registered_at   {_timestamp(endpoint.registered_at)}",
            f"  last_heartbeat  {_timestamp(endpoint.last_heartbeat)}",
            f"  expires_at      {_timestamp(endpoint.expires_at)}",
            f"  seconds_left    {_seconds_left(endpoint.expires_at, now)}",
        ]
    return "\n".join(lines) + "\n"


def event_to_json(event: RegistryEvent, received_at: float) -> dict[str, Any]:
    """Return an event as published, plus the Unix time at which it was received."""
    return {
        "event": event.event,
        "pubkey": event.pubkey,
        "model": event.model,
        "url": event.url,
        "received_at": round(received_at, 3),
    }


def format_event(event: RegistryEvent, received_at: float) -> str:
    """Return one line: time received, event, key prefix, model and URL."""
    iso = datetime.fromtimestamp(received_at, UTC).isoformat(timespec="milliseconds")
    return (
        f"{iso.replace('+00:00', 'Z')}  {event.event:<10}  {short_key(event.pubkey)}  "
        f"{event.model}  {event.url}\n"
    )
