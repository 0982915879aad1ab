"""The ``e2ee-registry`` admin command: list and show provider entries of a registry.

It reads the same data as the redis-cli recipes (``HGETALL e2ee:providers``,
``HGET e2ee:providers <key>``), decoded, with the seconds left on each lease.

Exit status: 0 success, 1 key not found, 2 invalid arguments, 3 registry unreachable
or failing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from registry import (
    InvalidPublicKey,
    ProviderEntry,
    Registry,
    RegistryError,
    normalize_pubkey,
    open_registry,
    redact_url,
)

__all__ = ["build_parser", "main"]

ENV_REGISTRY_URL = "GATEWAY_REGISTRY_URL"
ENV_PREFIX = "GATEWAY_REDIS_PREFIX"
DEFAULT_TIMEOUT_S = 2.0

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_REGISTRY = 3

KEY_PREFIX_CHARS = 16

Command = Callable[[Registry, argparse.Namespace], Awaitable[int]]


# --- output -------------------------------------------------------------------------


def _short_key(pubkey: str) -> str:
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


def _write_json(document: object, out: TextIO) -> None:
    out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")


def format_table(entries: Sequence[ProviderEntry], now: float) -> str:
    """Return one aligned row per endpoint, headed by the column names."""
    rows = [("KEY", "MODEL", "ALGO", "URL", "OWNER", "SECONDS_LEFT")]
    for entry in entries:
        for endpoint in entry.endpoints:
            rows.append(
                (
                    _short_key(entry.pubkey),
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


# --- commands -----------------------------------------------------------------------


async def _list(registry: Registry, args: argparse.Namespace) -> int:
    entries = await registry.entries()
    now = await registry.now()
    if args.json:
        _write_json({"now": now, "entries": [entry_to_json(e, now) for e in entries]}, sys.stdout)
    elif entries:
        sys.stdout.write(format_table(entries, now))
    else:
        print("no provider entries", file=sys.stderr)
    return EXIT_OK


async def _show(registry: Registry, args: argparse.Namespace) -> int:
    pubkey: str = args.key
    # entries(), not get(): the admin view includes endpoints whose lease has ended.
    entry = next((e for e in await registry.entries() if e.pubkey == pubkey), None)
    if entry is None:
        print(f"error: no provider entry for key {_short_key(pubkey)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    now = await registry.now()
    if args.json:
        _write_json({"now": now, "entry": entry_to_json(entry, now)}, sys.stdout)
    else:
        sys.stdout.write(format_entry(entry, now))
    return EXIT_OK


COMMANDS: dict[str, Command] = {"list": _list, "show": _show}


# --- arguments ----------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _pubkey(text: str) -> str:
    try:
        return normalize_pubkey(text)
    except InvalidPublicKey as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common_options(*, with_defaults: bool) -> argparse.ArgumentParser:
    """Return the options accepted both before and after the subcommand.

    Only the top-level copy has defaults, so that an option given before the
    subcommand is not reset by the subcommand's parser.
    """

    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("registry options")
    group.add_argument(
        "--registry-url",
        metavar="URL",
        default=default(os.environ.get(ENV_REGISTRY_URL)),
        help=(
            "registry to read: redis://[user:pass@]host:port/db or rediss://... "
            f"(default: ${ENV_REGISTRY_URL}); memory:// lives inside one gateway "
            "process and cannot be read from here"
        ),
    )
    group.add_argument(
        "--prefix",
        default=default(os.environ.get(ENV_PREFIX) or "e2ee"),
        help=f"Redis key prefix (default: ${ENV_PREFIX}, else e2ee)",
    )
    group.add_argument(
        "--timeout-s",
        type=_positive_seconds,
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT_S),
        help=f"connect and command timeout in seconds (default: {DEFAULT_TIMEOUT_S})",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON for scripts instead of text",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``e2ee-registry``."""
    parser = argparse.ArgumentParser(
        prog="e2ee-registry",
        description="Inspect the provider registry of e2ee-gateway.",
        epilog="Exit status: 0 success, 1 key not found, 2 invalid arguments, "
        "3 registry unreachable or failing.",
        parents=[_common_options(with_defaults=True)],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # TODO: add evict, watch, prune and --gateway (the admin API, which also serves memory://).
    # Each new command is one more subparser here and one more COMMANDS entry.
    commands.add_parser(
        "list",
        parents=[_common_options(with_defaults=False)],
        help="list every endpoint, with seconds left on its lease",
        description="List every endpoint of every key, expired ones included.",
    )
    show = commands.add_parser(
        "show",
        parents=[_common_options(with_defaults=False)],
        help="show one key's entry in full",
        description="Show one key's entry with every endpoint, expired ones included.",
    )
    show.add_argument(
        "key",
        type=_pubkey,
        metavar="KEY",
        help="model public key: 64 or 128 hex characters (a 130-character key may start 04)",
    )
    return parser


def _open(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Registry:
    url: str | None = args.registry_url
    if not url:
        parser.error(f"no registry URL: pass --registry-url or set {ENV_REGISTRY_URL}")
    if url.lower().startswith("memory:"):
        parser.error(
            "memory:// is private to one gateway process: pass the Redis URL that the gateway uses"
        )
    try:
        return open_registry(url, prefix=args.prefix, timeout_s=args.timeout_s)
    except ValueError as exc:
        parser.error(str(exc))


async def _run(command: Command, registry: Registry, args: argparse.Namespace) -> int:
    try:
        return await command(registry, args)
    finally:
        await registry.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``e2ee-registry`` and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    registry = _open(parser, args)
    try:
        return asyncio.run(_run(COMMANDS[args.command], registry, args))
    except RegistryError as exc:
        print(f"error: registry {redact_url(args.registry_url)}: {exc}", file=sys.stderr)
        return EXIT_REGISTRY


if __name__ == "__main__":
    sys.exit(main())
