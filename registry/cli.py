"""The ``e2ee-registry`` admin command: inspect and evict provider entries, watch events.

Two ways to reach the registry:

- ``--registry-url redis://...`` (or ``rediss://``, ``redis+sentinel://``): every
  command. ``list`` and ``show`` print the same data as the redis-cli recipes
  (``HGETALL e2ee:providers``, ``HGET e2ee:providers <key>``), decoded, with the seconds
  left on each lease. ``watch`` prints what ``SUBSCRIBE e2ee:events`` receives, and
  ``prune`` runs the reaper once.
- ``--gateway <admin URL> --admin-token-file F``: a running gateway's admin API, which
  works with every registry the gateway runs, ``memory://`` included. Only ``list``,
  ``show`` and ``evict``: the admin API has no event stream and no reaper call, and the
  gateway runs its own reaper.

Exit status: 0 success (also when ``watch`` is stopped with Ctrl-C), 1 key not found,
2 invalid arguments, 3 registry or gateway unreachable or failing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from registry import (
    InvalidPublicKey,
    KeyNotFound,
    ProviderEntry,
    RedisRegistry,
    Registry,
    RegistryError,
    RegistryUnavailable,
    normalize_pubkey,
    open_registry,
    redact_url,
)
from registry.admin_client import GatewayAdminClient, read_token_file
from registry.cli_output import (
    entry_to_json,
    event_to_json,
    format_entry,
    format_event,
    format_table,
    short_key,
    write_json,
    write_json_line,
)

__all__ = ["build_parser", "main"]

ENV_REGISTRY_URL = "GATEWAY_REGISTRY_URL"
ENV_PREFIX = "GATEWAY_REDIS_PREFIX"
DEFAULT_TIMEOUT_S = 2.0
WATCH_PING_INTERVAL_S = 1.0

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_REGISTRY = 3

REDIS_ONLY_COMMANDS = frozenset({"watch", "prune"})


class AdminView(Protocol):
    """Interface of ``list``, ``show`` and ``evict``: a Registry or the gateway's admin API."""

    async def entries(self) -> list[ProviderEntry]: ...

    async def now(self) -> float: ...

    async def deregister(
        self, pubkey: str, *, url: str | None, identity: str | None
    ) -> list[str]: ...

    async def aclose(self) -> None: ...


Command = Callable[[AdminView, argparse.Namespace], Awaitable[int]]


# --- commands -----------------------------------------------------------------------


async def _list(view: AdminView, args: argparse.Namespace) -> int:
    entries = await view.entries()
    now = await view.now()
    if args.json:
        write_json({"now": now, "entries": [entry_to_json(e, now) for e in entries]}, sys.stdout)
    elif entries:
        sys.stdout.write(format_table(entries, now))
    else:
        print("no provider entries", file=sys.stderr)
    return EXIT_OK


async def _show(view: AdminView, args: argparse.Namespace) -> int:
    pubkey: str = args.key
    # entries(), not get(): the admin view includes endpoints whose lease has ended.
    entry = next((e for e in await view.entries() if e.pubkey == pubkey), None)
    if entry is None:
        print(f"error: no provider entry for key {short_key(pubkey)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    now = await view.now()
    if args.json:
        write_json({"now": now, "entry": entry_to_json(entry, now)}, sys.stdout)
    else:
        sys.stdout.write(format_entry(entry, now))
    return EXIT_OK


async def _evict(view: AdminView, args: argparse.Namespace) -> int:
    pubkey: str = args.key
    try:
        removed = await view.deregister(pubkey, url=args.url, identity=None)
    except KeyNotFound:
        target = f"endpoint {args.url} of key" if args.url else "endpoint of key"
        print(f"error: no {target} {short_key(pubkey)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        write_json({"pubkey": pubkey, "removed": removed}, sys.stdout)
    else:
        for url in removed:
            print(f"evicted {short_key(pubkey)} {url}")
    return EXIT_OK


async def _prune(view: AdminView, args: argparse.Namespace) -> int:
    assert isinstance(view, RedisRegistry)
    removed = await view.reap()
    if args.json:
        write_json({"removed": removed}, sys.stdout)
    else:
        print(f"removed {removed} expired endpoint(s)")
    return EXIT_OK


async def _watch(view: AdminView, args: argparse.Namespace) -> int:
    """Print one line per event until Ctrl-C or ``--count`` events.

    A PING every second that stays unanswered for ``--timeout-s`` more ends the command
    with exit status 3, so a dead connection does not look like a quiet registry.
    """
    assert isinstance(view, RedisRegistry)
    subscription = view.events(timeout_s=args.timeout_s)
    try:
        await subscription.open()
        if not args.json:
            print(f"watching {view.events_channel} (Ctrl-C to stop)", file=sys.stderr)
        printed = 0
        pinged_at = time.monotonic()
        while args.count is None or printed < args.count:
            event = await subscription.next_event(WATCH_PING_INTERVAL_S / 2)
            if event is not None:
                received_at = time.time()
                if args.json:
                    write_json_line(event_to_json(event, received_at), sys.stdout)
                else:
                    sys.stdout.write(format_event(event, received_at))
                sys.stdout.flush()
                printed += 1
            mono = time.monotonic()
            if mono - subscription.received_at > WATCH_PING_INTERVAL_S + args.timeout_s:
                raise RegistryUnavailable(
                    f"no reply to PING on the event subscription within {args.timeout_s:g} s"
                )
            if mono - pinged_at >= WATCH_PING_INTERVAL_S:
                await subscription.ping()
                pinged_at = mono
    finally:
        await subscription.aclose()
    return EXIT_OK


COMMANDS: dict[str, Command] = {
    "list": _list,
    "show": _show,
    "evict": _evict,
    "watch": _watch,
    "prune": _prune,
}


# --- arguments ----------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


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
            "Redis registry: redis://[user:pass@]host:port/db, rediss://... or "
            "redis+sentinel://[user:pass@]host:port[,host:port...]/<service>[/<db>] "
            f"(default: ${ENV_REGISTRY_URL}); for memory:// use --gateway"
        ),
    )
    group.add_argument(
        "--gateway",
        metavar="ADMIN_URL",
        default=default(None),
        help="use a running gateway's admin API instead, e.g. http://127.0.0.1:9090 "
        "(list, show and evict only; works with memory://)",
    )
    group.add_argument(
        "--admin-token-file",
        metavar="FILE",
        default=default(None),
        help="file with the gateway's admin token (required with --gateway)",
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


def _key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "key",
        type=_pubkey,
        metavar="KEY",
        help="model public key: 64 or 128 hex characters (a 130-character key may start 04)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``e2ee-registry``."""
    parser = argparse.ArgumentParser(
        prog="e2ee-registry",
        description="Inspect and manage the provider registry of e2ee-gateway.",
        epilog="Exit status: 0 success, 1 key not found, 2 invalid arguments, "
        "3 registry or gateway unreachable or failing.",
        parents=[_common_options(with_defaults=True)],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            parents=[_common_options(with_defaults=False)],
            help=summary,
            description=description,
        )

    add(
        "list",
        "list every endpoint, with seconds left on its lease",
        "List every endpoint of every key, expired ones included.",
    )
    _key_argument(
        add(
            "show",
            "show one key's entry in full",
            "Show one key's entry with every endpoint, expired ones included.",
        )
    )
    evict = add(
        "evict",
        "remove a key's endpoints as the admin",
        "Remove every endpoint of a key, or only --url, as the admin. Other replicas of "
        "the gateway stop routing to them at once; a provider that keeps sending "
        "heartbeats registers again.",
    )
    _key_argument(evict)
    evict.add_argument("--url", metavar="URL", help="remove only this endpoint (base URL)")
    watch = add(
        "watch",
        "print registry events as they happen (Redis only)",
        "Subscribe to <prefix>:events and print one line per event until Ctrl-C.",
    )
    watch.add_argument("--count", type=_positive_count, metavar="N", help="stop after N events")
    add(
        "prune",
        "remove ended leases once and print how many (Redis only)",
        "Run the reaper once: remove the endpoints whose lease has ended.",
    )
    return parser


def _open(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[Registry | None, str | None]:
    """Validate the target options; return the Redis registry, or the admin token."""
    if args.gateway:
        if args.command in REDIS_ONLY_COMMANDS:
            parser.error(
                f"{args.command} needs --registry-url (Redis): the gateway's admin API has "
                "no event stream and no reaper call"
            )
        if not args.admin_token_file:
            parser.error("--gateway needs --admin-token-file")
        try:
            return None, read_token_file(args.admin_token_file)
        except ValueError as exc:
            parser.error(str(exc))

    url: str | None = args.registry_url
    if not url:
        parser.error(f"no registry: pass --registry-url, set {ENV_REGISTRY_URL}, or use --gateway")
    if url.lower().startswith("memory:"):
        parser.error(
            "memory:// is private to one gateway process: pass --gateway <admin URL> "
            "--admin-token-file F, or the Redis URL that the gateway uses"
        )
    try:
        registry = open_registry(url, prefix=args.prefix, timeout_s=args.timeout_s, snapshot=False)
    except ValueError as exc:
        parser.error(str(exc))
    return registry, None


async def _run(
    command: Command, registry: Registry | None, token: str | None, args: argparse.Namespace
) -> int:
    view: AdminView
    if registry is not None:
        view = registry
    else:
        assert token is not None
        view = GatewayAdminClient(args.gateway, token, timeout_s=args.timeout_s)
    try:
        return await command(view, args)
    finally:
        await view.aclose()


def _target(args: argparse.Namespace) -> str:
    if args.gateway:
        return f"gateway {redact_url(args.gateway)}"
    return f"registry {redact_url(args.registry_url)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``e2ee-registry`` and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    registry, token = _open(parser, args)
    try:
        return asyncio.run(_run(COMMANDS[args.command], registry, token, args))
    except KeyboardInterrupt:
        return EXIT_OK
    except RegistryError as exc:
        print(f"error: {_target(args)}: {exc}", file=sys.stderr)
        return EXIT_REGISTRY


if __name__ == "__main__":
    sys.exit(main())
