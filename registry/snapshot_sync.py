"""Keeping a per-replica snapshot current, and tracking whether Redis replies.

``SnapshotSync`` owns a ``SnapshotState`` and three named background tasks:

- ``registry-snapshot-subscriber``: one subscription to ``<prefix>:events`` on its own
  connection. Each event re-reads its key. A PING is sent every
  ``health_check_interval_s``, and one left without reply for ``timeout_s`` more marks
  the connection dead: a frozen Redis raises no socket error. Every new subscription
  requests a reload, because messages published while it was down are lost.
- ``registry-snapshot-resync``: a full reload (HGETALL + TIME) every
  ``resync_interval_s``, at once when asked, and with jittered backoff while failing.
- ``registry-snapshot-refresher``: re-reads the keys that events named, many keys per
  HMGET.

Every Redis reply and failure passes through ``note_reply`` / ``note_failure``, which
track the outage: its start, and the registry time frozen at the last reply before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

from registry.base import RegistryError, RegistryUnavailable
from registry.redis_backend import RedisRegistry
from registry.redis_io import EventSubscription, RegistryEvent
from registry.snapshot_state import RegistryClock, SnapshotState, SnapshotStats

__all__ = ["SnapshotSync", "await_shared", "cancel_and_wait", "retrieve_result"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

REFRESH_BATCH = 256
"""Maximum number of keys that one HMGET re-reads after events."""

_FIRST_BACKOFF_S = 0.1


def retrieve_result(task: asyncio.Task[T]) -> None:
    """Done callback that reads a shared task's exception.

    Every waiter of the task may have been cancelled; reading the exception here keeps
    asyncio from logging it as never retrieved.
    """
    if not task.cancelled():
        task.exception()


async def await_shared(task: asyncio.Task[T]) -> T:
    """Await a task that other callers share, without cancelling it for them.

    A caller that is cancelled leaves and the task goes on. When the task itself was
    cancelled (by ``aclose()``) while this caller was not, RegistryUnavailable is raised
    instead of a CancelledError that the caller never asked for.
    """
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if task.cancelled() and current is not None and current.cancelling() == 0:
            raise RegistryUnavailable("the registry was closed during the read") from None
        raise


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], reason: str) -> None:
    """Cancel the tasks and return once all are done, cancelling again any that go on.

    A single cancel can be lost: on CPython 3.11, ``asyncio.wait_for`` returns the inner
    result when the cancel lands as that result arrives
    (https://github.com/python/cpython/issues/86296, fixed in 3.12), and redis-py wraps
    each socket write in ``wait_for``.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel(reason)
        _, pending = await asyncio.wait(pending, timeout=0.05)


class _Backoff:
    """Exponential backoff with jitter: each delay is drawn from [ceiling/2, ceiling]."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling: float = min(self._max_s, self._first_s * 2.0**self._attempt)
        self._attempt = min(self._attempt + 1, 30)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self._attempt = 0


class SnapshotSync:
    """The snapshot's state, its background tasks and the Redis reachability record."""

    def __init__(
        self,
        inner: RedisRegistry,
        *,
        outage_grace_s: float,
        resync_interval_s: float,
        timeout_s: float,
        health_check_interval_s: float,
        max_backoff_s: float,
        monotonic: Callable[[], float],
    ) -> None:
        self.inner = inner
        self.state = SnapshotState()
        self.clock = RegistryClock()
        self.stats = SnapshotStats()
        self.monotonic = monotonic
        self.grace_s = outage_grace_s
        self._resync_interval_s = resync_interval_s
        self._timeout_s = timeout_s
        self._health_interval_s = health_check_interval_s
        self._max_backoff_s = max_backoff_s

        self.closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._reads_by_seq: Counter[int] = Counter()
        self._resync_task: asyncio.Task[None] | None = None
        self._resync_requested = asyncio.Event()
        self._dirty: set[str] = set()
        self._dirty_wakeup = asyncio.Event()
        self._subscribed_once = False
        self._subscription_failing = False
        self._grace_exceeded_logged = False

        # Monotonic times: last full load, last Redis reply, start of the outage.
        self.synced_at: float | None = None
        self._last_reply_at: float | None = None
        self.unreachable_since: float | None = None
        # Registry time at the last reply before the outage: the snapshot's clock stays
        # at that time while the outage lasts.
        self._frozen_now: float | None = None

    @property
    def ready(self) -> bool:
        if self.synced_at is None:
            return False
        since = self.unreachable_since
        return since is None or self.monotonic() - since < self.grace_s

    def start_tasks(self) -> None:
        self._tasks = [
            asyncio.create_task(self._subscribe_forever(), name="registry-snapshot-subscriber"),
            asyncio.create_task(self._resync_forever(), name="registry-snapshot-resync"),
            asyncio.create_task(self._refresh_forever(), name="registry-snapshot-refresher"),
        ]

    def running_tasks(self) -> list[asyncio.Task[None]]:
        """Return the background tasks and the reload in flight, for cancellation."""
        tasks = list(self._tasks)
        if self._resync_task is not None:
            tasks.append(self._resync_task)
        return tasks

    # --- reachability -------------------------------------------------------------------

    async def call(self, call: Awaitable[T]) -> T:
        """Await a call to the inner registry and record whether Redis replied."""
        try:
            result = await call
        except RegistryUnavailable as exc:
            self.note_failure(exc)
            raise
        except RegistryError:
            self.note_reply()
            raise
        self.note_reply()
        return result

    def note_reply(self, redis_time: float | None = None) -> None:
        """Record a Redis reply, with the Redis ``TIME`` it carried, if any; end an outage."""
        mono = self.monotonic()
        self._last_reply_at = mono
        if redis_time is not None:
            self.clock.sync(redis_time, mono)
        since = self.unreachable_since
        if since is not None:
            logger.info("Redis reachable again after %.1f s; reloading the snapshot", mono - since)
            self.unreachable_since = None
            self._frozen_now = None
            self._grace_exceeded_logged = False
            self._resync_requested.set()

    def note_failure(self, exc: RegistryUnavailable) -> None:
        """Record a failed Redis call; the first one starts an outage."""
        self.stats.redis_errors += 1
        if self.unreachable_since is not None:
            return
        self.unreachable_since = self.monotonic()
        last = self._last_reply_at
        self._frozen_now = self.clock.at(last) if last is not None else None
        if self._frozen_now is None:
            logger.warning("Redis unreachable before the snapshot was loaded: %s", exc)
            return
        logger.warning(
            "Redis unreachable (%s): serving %d snapshot keys for up to %g s",
            exc,
            len(self.state),
            self.grace_s,
        )

    def outage_now(self, failure: RegistryUnavailable | None) -> float:
        """Return the frozen registry time to serve the snapshot with during an outage.

        Raises RegistryUnavailable (chained to ``failure``) when nothing was ever read
        or the outage has lasted ``outage_grace_s`` or longer.
        """
        since = self.unreachable_since
        frozen = self._frozen_now
        if since is None or frozen is None:
            self.stats.lookups_unavailable += 1
            raise RegistryUnavailable("Redis is unreachable and nothing was loaded") from failure
        elapsed = self.monotonic() - since
        if elapsed >= self.grace_s:
            if not self._grace_exceeded_logged:
                self._grace_exceeded_logged = True
                logger.error(
                    "Redis unreachable for %.0f s, past the %g s outage grace: lookups fail "
                    "until it replies",
                    elapsed,
                    self.grace_s,
                )
            self.stats.lookups_unavailable += 1
            raise RegistryUnavailable(
                f"Redis has been unreachable for {elapsed:.0f} s, longer than the "
                f"{self.grace_s:g} s outage grace"
            ) from failure
        return frozen

    # --- reads ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def read_window(self) -> Iterator[int]:
        """Note the sequence number at which a read starts, for ``SnapshotState.install``."""
        seq = self.state.seq
        self._reads_by_seq[seq] += 1
        try:
            yield seq
        finally:
            self._reads_by_seq[seq] -= 1
            if not self._reads_by_seq[seq]:
                del self._reads_by_seq[seq]

    async def reload(self, *, join: bool) -> bool:
        """Reload every entry; return True when it joined a reload already running.

        ``join=False`` waits for a running reload and then starts a new one, for callers
        that need a read that began after some moment (a new subscription).
        Raises RegistryUnavailable when Redis does not reply.
        """
        running = self._resync_task
        if running is not None and not running.done():
            if join:
                await await_shared(running)
                return True
            await asyncio.wait([running])
        if self.closed:
            raise RegistryUnavailable("the registry is closed")
        task = asyncio.create_task(self._reload_once(), name="registry-snapshot-load")
        task.add_done_callback(retrieve_result)
        self._resync_task = task
        await await_shared(task)
        return False

    async def _reload_once(self) -> None:
        with self.read_window() as read_seq:
            try:
                redis_now, entries, models = await self.inner.read_snapshot()
            except RegistryUnavailable as exc:
                self.note_failure(exc)
                raise
            self.note_reply(redis_now)
            self.state.replace_all(entries, read_seq)
            self.state.merge_models(models)
        self.synced_at = self.monotonic()
        self.stats.resyncs += 1
        self.state.forget_touches(min(self._reads_by_seq, default=self.state.seq))

    # --- background tasks -----------------------------------------------------------------

    async def _resync_forever(self) -> None:
        backoff = _Backoff(_FIRST_BACKOFF_S, self._max_backoff_s)
        delay = self._resync_interval_s
        while not self.closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._resync_requested.wait()
            self._resync_requested.clear()
            try:
                await self.reload(join=False)
            except RegistryError as exc:
                delay = backoff.next_delay()
                logger.debug("snapshot reload failed, next try in %.2f s: %s", delay, exc)
            else:
                backoff.reset()
                delay = self._resync_interval_s

    async def _refresh_forever(self) -> None:
        while not self.closed:
            await self._dirty_wakeup.wait()
            self._dirty_wakeup.clear()
            while self._dirty:
                batch = [self._dirty.pop() for _ in range(min(len(self._dirty), REFRESH_BATCH))]
                with self.read_window() as read_seq:
                    try:
                        redis_now, stored = await self.call(self.inner.read_entries(batch))
                    except RegistryError as exc:
                        # The reload that follows recovery reads these keys again.
                        logger.debug("re-reading %d keys failed: %s", len(batch), exc)
                        self._dirty.clear()
                        self._resync_requested.set()
                        break
                    self.clock.sync(redis_now, self.monotonic())
                    for pubkey in batch:
                        self.state.install(pubkey, stored[pubkey], read_seq)

    async def _subscribe_forever(self) -> None:
        backoff = _Backoff(_FIRST_BACKOFF_S, self._max_backoff_s)
        while not self.closed:
            subscription = self.inner.events(timeout_s=self._timeout_s, monotonic=self.monotonic)
            try:
                await subscription.open()
                await self._pump(subscription, backoff)
            except RegistryError as exc:
                if isinstance(exc, RegistryUnavailable):
                    self.note_failure(exc)
                if not self._subscription_failing:
                    logger.warning("event subscription lost, reconnecting: %s", exc)
                self._subscription_failing = True
            finally:
                await subscription.aclose()
            await asyncio.sleep(backoff.next_delay())

    async def _pump(self, subscription: EventSubscription, backoff: _Backoff) -> None:
        """Apply events and check the connection with PING; raise when a PING goes unanswered.

        A PING is sent every health check interval, and the connection counts as dead when
        no reply of any kind arrives within the timeout after one. An earlier rule limited
        the silence since the last reply to the interval plus the timeout. Between two
        PINGs that silence already reaches the interval plus one wait of this loop, so a
        busy gateway raised false alarms.
        """
        confirmations = 0
        received_at = subscription.received_at
        pinged_at = self.monotonic()
        unanswered_ping_at: float | None = None
        while not self.closed:
            if subscription.subscriptions != confirmations:
                # A first subscription, or one that redis-py renewed on a new connection:
                # messages published in between are lost, so reload everything.
                confirmations = subscription.subscriptions
                if self._subscribed_once:
                    self.stats.subscriber_reconnects += 1
                if self._subscription_failing:
                    logger.info("event subscription restored")
                    self._subscription_failing = False
                self._subscribed_once = True
                backoff.reset()
                self._resync_requested.set()
            if subscription.received_at != received_at:
                received_at = subscription.received_at
                self.note_reply()

            mono = self.monotonic()
            if unanswered_ping_at is not None and received_at >= unanswered_ping_at:
                unanswered_ping_at = None
            if unanswered_ping_at is not None and mono - unanswered_ping_at > self._timeout_s:
                raise RegistryUnavailable(
                    "no reply to PING on the event subscription for "
                    f"{mono - unanswered_ping_at:.1f} s"
                )
            if unanswered_ping_at is None and mono - pinged_at >= self._health_interval_s:
                await subscription.ping()
                pinged_at = unanswered_ping_at = mono

            event = await subscription.next_event(self._health_interval_s / 2)
            if event is not None:
                self._apply_event(event)

    def _apply_event(self, event: RegistryEvent) -> None:
        self.stats.events_applied += 1
        if event.event in ("deregister", "expire"):
            self.state.remove_endpoints(event.pubkey, (event.url,))
        else:
            self.state.touch(event.pubkey)
            # The heartbeat script stored its own time in the models hash; the estimate
            # is within a round trip of it.
            now = self.clock.at(self.monotonic())
            if now is not None:
                self.state.note_model_live(event.model, now)
        self._dirty.add(event.pubkey)
        self._dirty_wakeup.set()
