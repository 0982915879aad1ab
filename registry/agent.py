"""The heartbeat agent (``e2ee-heartbeat``): keeps a provider's keys registered with a gateway.

It runs beside one provider and loops in rounds:

1. Check the provider's ``GET /health``. While it fails, send no heartbeats: the
   gateway's entries expire after their TTL and clients stop being routed there.
2. Re-read the provider's attestation report every ``report_interval_s`` and whenever
   health recovers, to learn its keys (one per signing algorithm).
3. Heartbeat every key to the gateway's admin listener.
4. Deregister keys that the report replaced, once their successors were sent.
5. Wait the gateway's ``heartbeat_interval_s`` with +-10% jitter, or a backoff with full
   jitter while the gateway is unreachable or responds with 5xx.

``stop()`` ends the loop; ``run()`` then deregisters every key it registered. The token is
never logged, and keys are logged as their first 16 hex characters.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
from collections.abc import Callable, Sequence

import aiohttp
import orjson
from yarl import URL

from registry.agent_logic import (
    AgentConfig,
    BeatOutcome,
    ReportError,
    backoff_cap_s,
    backoff_s,
    classify_beat_status,
    config_from_args,
    diff_keys,
    error_message,
    jittered_s,
    key_prefix,
    parse_args,
    parse_report_key,
)

__all__ = ["AgentConfig", "HeartbeatAgent", "main"]

logger = logging.getLogger(__name__)

_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class HeartbeatAgent:
    """Heartbeats one provider's keys until ``stop()``, then deregisters them.

    ``session`` is used as given and left open; without one the agent opens its own and
    closes it when ``run()`` returns. ``rand`` (like ``random.random``) drives the jitter.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        session: aiohttp.ClientSession | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._config = config
        self._session = session
        self._rand = rand
        self._stopping = asyncio.Event()
        self._interval_s = config.ttl_s / 3
        self._ttl_s = config.ttl_s
        self._failures = 0
        self._provider_healthy = True
        self._report_due_at = 0.0
        self._keys: dict[str, str] = {}
        if config.pubkey is not None:
            self._keys[config.signing_algos[0]] = config.pubkey
        self._registered: set[str] = set()
        self._retired: set[str] = set()
        self._replaced: list[str] = []
        self._unoffered: set[str] = set()

    @property
    def keys(self) -> dict[str, str]:
        """The keys being heartbeated, by signing algorithm."""
        return dict(self._keys)

    @property
    def registered(self) -> frozenset[str]:
        """Keys the gateway accepted and that this agent has not deregistered yet."""
        return frozenset(self._registered)

    def stop(self) -> None:
        """Ask ``run()`` to deregister and return; safe to call from a signal handler."""
        self._stopping.set()

    async def run(self) -> None:
        """Heartbeat until ``stop()``, then deregister every registered key and return."""
        session = self._session or aiohttp.ClientSession()
        config = self._config
        try:
            logger.info(
                "heartbeat agent %s started: model %s, provider %s, gateway %s",
                config.instance_id,
                config.model,
                config.endpoint,
                URL(config.gateway_url).with_user(None),
            )
            while not self._stopping.is_set():
                try:
                    delay_s = await self._round(session)
                except Exception:
                    # A bug in one round must not end the heartbeats of a healthy provider.
                    logger.exception("heartbeat round failed")
                    delay_s = jittered_s(self._interval_s, self._rand)
                await self._sleep(delay_s)
            await self._deregister_all(session)
            logger.info("heartbeat agent %s stopped", config.instance_id)
        finally:
            if self._session is None:
                await session.close()

    async def _sleep(self, delay_s: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)
        except TimeoutError:
            pass

    async def _round(self, session: aiohttp.ClientSession) -> float:
        """Run one round and return the seconds to wait before the next."""
        # Step 1: no heartbeats while the provider is unhealthy.
        if not await self._check_health(session):
            return jittered_s(self._interval_s, self._rand)

        # Step 2: learn the current keys.
        loop = asyncio.get_running_loop()
        if self._config.pubkey is None and loop.time() >= self._report_due_at:
            if await self._refresh_keys(session):
                self._report_due_at = loop.time() + self._config.report_interval_s

        # Step 3: heartbeat every key.
        live = [(algo, key) for algo, key in self._keys.items() if key not in self._retired]
        beats = [self._beat(session, algo, key) for algo, key in live]
        outcomes = await asyncio.gather(*beats)

        # Step 4: deregister replaced keys after their successors were sent.
        if self._replaced:
            self._replaced = [k for k in self._replaced if not await self._deregister(session, k)]

        # Step 5: schedule the next round.
        report_failed = self._config.pubkey is None and loop.time() >= self._report_due_at
        if BeatOutcome.TRANSIENT in outcomes or report_failed:
            self._failures += 1
            cap_s = backoff_cap_s(self._interval_s, self._ttl_s)
            return backoff_s(
                self._failures, base_s=self._config.backoff_base_s, cap_s=cap_s, rand=self._rand
            )
        self._failures = 0
        return jittered_s(self._interval_s, self._rand)

    async def _check_health(self, session: aiohttp.ClientSession) -> bool:
        """Return whether the provider's health check passes; log each change once."""
        url = self._config.health_url
        timeout = aiohttp.ClientTimeout(total=self._config.request_timeout_s)
        try:
            async with session.get(url, timeout=timeout) as response:
                await response.read()
                problem = None if response.status == 200 else f"status {response.status}"
        except _TRANSPORT_ERRORS as exc:
            problem = _describe(exc)

        if problem is not None:
            if self._provider_healthy:
                logger.warning("provider health check failed (%s): heartbeats paused", problem)
            self._provider_healthy = False
            return False
        if not self._provider_healthy:
            logger.info("provider is healthy again: heartbeats resume")
            self._provider_healthy = True
            self._report_due_at = 0.0
        return True

    async def _refresh_keys(self, session: aiohttp.ClientSession) -> bool:
        """Read the report for each algorithm and apply key changes; return False on failure.

        On failure the current keys stay as they are until the next successful read.
        """
        fetched: dict[str, str] = {}
        for algo in self._config.signing_algos:
            try:
                key = await self._read_report_key(session, algo)
            except (*_TRANSPORT_ERRORS, ReportError) as exc:
                logger.warning("reading the %s attestation report failed: %s", algo, _describe(exc))
                return False
            if key is None:
                if algo not in self._unoffered:
                    logger.warning("the provider does not offer %s keys: skipped", algo)
                    self._unoffered.add(algo)
                continue
            self._unoffered.discard(algo)
            fetched[algo] = key

        for change in diff_keys(self._keys, fetched):
            if change.new is not None:
                logger.info("%s key %s found in the report", change.algo, key_prefix(change.new))
            if change.old is not None:
                logger.info("%s key %s was replaced", change.algo, key_prefix(change.old))
                if change.old in self._registered:
                    self._replaced.append(change.old)
        if not fetched:
            logger.warning("the attestation report offers no key for %s", self._config.model)
        self._keys = fetched
        return True

    async def _read_report_key(self, session: aiohttp.ClientSession, algo: str) -> str | None:
        """Return the report's ``algo`` key, or None when the provider rejects that algorithm.

        Raises ReportError for a malformed report or an unexpected status.
        """
        url = self._config.report_request_url(algo)
        timeout = aiohttp.ClientTimeout(total=self._config.report_timeout_s)
        async with session.get(url, timeout=timeout) as response:
            body = await response.read()
            status = response.status
        if status == 400:
            return None
        if status != 200:
            raise ReportError(f"the provider returned status {status}: {error_message(body)}")
        try:
            report = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ReportError("the attestation report is not JSON") from exc
        return parse_report_key(report, self._config.model, algo)

    async def _beat(self, session: aiohttp.ClientSession, algo: str, key: str) -> BeatOutcome:
        """Send one heartbeat for ``key``, log the result and return how to treat it."""
        config = self._config
        payload = {
            "pubkey": key,
            "model": config.model,
            "url": config.endpoint,
            "signing_algo": algo,
            "ttl_s": config.ttl_s,
            "instance_id": config.instance_id,
        }
        headers = {"Authorization": f"Bearer {config.token}"}
        timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
        try:
            async with session.post(
                config.heartbeat_url, json=payload, headers=headers, timeout=timeout
            ) as response:
                body = await response.read()
                status = response.status
        except _TRANSPORT_ERRORS as exc:
            logger.warning("heartbeat for key %s failed: %s", key_prefix(key), _describe(exc))
            return BeatOutcome.TRANSIENT

        outcome = classify_beat_status(status)
        match outcome:
            case BeatOutcome.OK:
                self._accept(key, body)
            case BeatOutcome.TRANSIENT:
                logger.warning(
                    "heartbeat for key %s failed: gateway status %d: %s",
                    key_prefix(key),
                    status,
                    error_message(body),
                )
            case BeatOutcome.REJECTED:
                logger.error(
                    "gateway rejected the heartbeat for key %s with status %d: %s",
                    key_prefix(key),
                    status,
                    error_message(body),
                )
            case BeatOutcome.RETIRED:
                logger.warning(
                    "gateway retired key %s for this agent instance: heartbeats for it stop",
                    key_prefix(key),
                )
                self._retired.add(key)
                self._registered.discard(key)
        return outcome

    def _accept(self, key: str, body: bytes) -> None:
        """Record a successful heartbeat and adopt the gateway's interval and TTL."""
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        interval = answer.get("heartbeat_interval_s") if isinstance(answer, dict) else None
        expires = answer.get("expires_in_s") if isinstance(answer, dict) else None
        if isinstance(interval, int | float) and interval > 0:
            self._interval_s = float(interval)
        if isinstance(expires, int | float) and expires > 0:
            self._ttl_s = float(expires)

        if key not in self._registered:
            logger.info(
                "registered key %s for model %s (heartbeat every %.1f s)",
                key_prefix(key),
                self._config.model,
                self._interval_s,
            )
            self._registered.add(key)

    async def _deregister(self, session: aiohttp.ClientSession, key: str) -> bool:
        """Delete this provider's endpoint of ``key``; return False when worth retrying."""
        headers = {"Authorization": f"Bearer {self._config.token}"}
        timeout = aiohttp.ClientTimeout(total=self._config.request_timeout_s)
        try:
            async with session.delete(
                self._config.deregister_url(key), headers=headers, timeout=timeout
            ) as response:
                body = await response.read()
                status = response.status
        except _TRANSPORT_ERRORS as exc:
            logger.warning("deregistering key %s failed: %s", key_prefix(key), _describe(exc))
            return False

        self._registered.discard(key)
        if status in (204, 404):
            logger.info("deregistered key %s", key_prefix(key))
            return True
        logger.warning(
            "deregistering key %s failed with status %d: %s",
            key_prefix(key),
            status,
            error_message(body),
        )
        return status < 500

    async def _deregister_all(self, session: aiohttp.ClientSession) -> None:
        keys = sorted(self._registered | set(self._replaced))
        await asyncio.gather(*(self._deregister(session, key) for key in keys))


async def _run(config: AgentConfig) -> None:
    agent = HeartbeatAgent(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.stop)
    await agent.run()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGTERM or SIGINT; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"e2ee-heartbeat: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_run(config))
    return 0


if __name__ == "__main__":
    # Import the module under its package name, so log records name "registry.agent".
    from registry.agent import main as package_main

    sys.exit(package_main())
