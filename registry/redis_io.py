"""Redis I/O shared by the Redis backend and the snapshot: error translation and events.

``redis_errors`` is the one place where redis-py exception types are caught and turned
into registry errors. ``EventSubscription`` reads the ``<prefix>:events`` channel on a
connection of its own, so that the short command timeout never cuts its blocking reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import orjson
import redis.exceptions
from redis.asyncio.client import PubSub

from registry.base import RegistryError, RegistryUnavailable

__all__ = ["EVENT_KINDS", "EventSubscription", "RegistryEvent", "parse_event", "redis_errors"]

logger = logging.getLogger(__name__)

EVENT_KINDS = frozenset({"register", "refresh", "deregister", "expire"})
"""Values of the ``event`` field that the Lua scripts publish."""


@contextmanager
def redis_errors(operation: str) -> Iterator[None]:
    """Translate redis-py errors raised inside the block into registry errors.

    Connection, timeout and socket errors (and a replica that turned read-only during a
    failover) become RegistryUnavailable, any other Redis error RegistryError.
    """
    try:
        yield
    # NOTE: redis-py's MaxConnectionsError (a full pool: 100 connections by default) is a
    # ConnectionError, so more than 100 concurrent commands read as an unreachable Redis.
    except (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.ReadOnlyError,
        OSError,
    ) as exc:
        raise RegistryUnavailable(f"Redis {operation} failed: {exc}") from exc
    except redis.exceptions.RedisError as exc:
        raise RegistryError(f"Redis {operation} failed: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RegistryEvent:
    """One message of the events channel: what happened to which endpoint of a key."""

    event: str
    pubkey: str
    model: str
    url: str

    def __post_init__(self) -> None:
        if self.event not in EVENT_KINDS:
            raise ValueError(f"unknown registry event {self.event!r}")


def parse_event(data: bytes | str) -> RegistryEvent | None:
    """Decode an events-channel message; return None when it is not a registry event."""
    try:
        fields = orjson.loads(data)
        return RegistryEvent(
            str(fields["event"]), str(fields["pubkey"]), str(fields["model"]), str(fields["url"])
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class EventSubscription:
    """A subscription to the events channel on a pub/sub connection of its own.

    ``subscriptions`` counts the confirmations of the SUBSCRIBE. redis-py subscribes again
    by itself after it replaced a broken connection, and the messages published in
    between are lost, so after a count above one the reader must reload what it caches.
    ``received_at`` is the ``monotonic`` time of the last reply of any kind (event,
    PONG or confirmation). When it stays old after a ``ping()``, the connection is dead,
    although no socket error was raised.
    """

    def __init__(
        self,
        pubsub: PubSub,
        channel: str,
        *,
        timeout_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pubsub = pubsub
        self._channel = channel
        self._timeout_s = timeout_s
        self._monotonic = monotonic
        self.subscriptions = 0
        self.received_at = monotonic()

    async def open(self) -> None:
        """Subscribe and wait for the confirmation; raise RegistryUnavailable after the timeout."""
        try:
            async with asyncio.timeout(self._timeout_s):
                with redis_errors("SUBSCRIBE"):
                    await self._pubsub.subscribe(self._channel)
                while self.subscriptions == 0:
                    await self.next_event(self._timeout_s)
        except TimeoutError as exc:
            raise RegistryUnavailable(
                f"Redis SUBSCRIBE {self._channel} not confirmed within {self._timeout_s} s"
            ) from exc

    async def next_event(self, wait_s: float) -> RegistryEvent | None:
        """Return the next event; None once ``wait_s`` passed or a reply that is no event came.

        Raises RegistryUnavailable when the connection failed and could not be replaced.
        """
        with redis_errors("pub/sub read"):
            message = await self._pubsub.get_message(timeout=wait_s)
        if message is None:
            return None
        self.received_at = self._monotonic()
        kind = message["type"]
        if kind == "subscribe":
            self.subscriptions += 1
            return None
        if kind != "message":
            return None
        event = parse_event(message["data"])
        if event is None:
            logger.warning("ignoring a malformed message on %s", self._channel)
        return event

    async def ping(self) -> None:
        """Send PING on the subscription; its reply only updates ``received_at``."""
        with redis_errors("pub/sub PING"):
            await self._pubsub.ping()

    async def aclose(self) -> None:
        """Close the connection. A failure to close it is logged, not raised."""
        try:
            with redis_errors("pub/sub close"):
                await self._pubsub.aclose()
        except RegistryError as exc:
            logger.debug("closing the event subscription failed: %s", exc)
