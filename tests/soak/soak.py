"""Soak run: mixed traffic against one gateway on its own Redis, watching for growth.

One process runs everything on 127.0.0.1: a private redis-server (stopped at the end),
the gateway on that Redis registry, two in-process demo providers (one healthy, one
responding with 500) and the client. Requests start at a fixed rate, drawn from a mix of
pinned streams, unpinned JSON completions, stale keys (421), a failing provider (502
after retries) and heartbeats of short-lived endpoints that expire or deregister.
Every response is checked against the error contract.

Every ``--report-interval-s`` one line reports RSS, open descriptors, asyncio tasks,
event-loop lag and the answers so far. After ``--warmup-s`` and again at the end,
traffic pauses until nothing is in flight and idle pooled connections have closed, and
the process is measured at rest: the baseline and the final state. The run exits 1 when
RSS grew by more than ``--max-rss-growth`` (a fraction) over the baseline, descriptors
by more than ``--max-fd-growth``, tasks by more than ``--max-task-growth``, or when any
answer broke the contract or anything was logged at ERROR or with a traceback. It
stops by itself after ``--duration-s``.

Run it with ``make soak`` or ``.venv/bin/python tests/soak/soak.py --duration-s 120``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

_TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_TESTS.parent), str(_TESTS)]

from redis_processes import RedisProcess, start_redis  # noqa: E402
from soak_metrics import LagMonitor, Limits, LogWatch, Report, check, open_fds, rss_kib  # noqa: E402

from proxy.config import Settings  # noqa: E402
from proxy.demo.provider import DemoConfig, DemoServer, serve_demo_provider  # noqa: E402
from proxy.server import RunningGateway, start_gateway  # noqa: E402

MODEL = "demo-model"
PROVIDER_TOKEN = "soak-provider-token"
ADMIN_TOKEN = "soak-admin-token"
REQUEST_TIMEOUT_S = 10.0
MAX_IN_FLIGHT = 200
KEEPALIVE_INTERVAL_S = 1.0
UPSTREAM_KEEPALIVE_S = 2.0

STALE_KEY_BODY = (
    b'{"error":{"message":"The encryption key is no longer valid. Please refresh your '
    b'attestation report and retry.","type":"provider_error","param":null,"code":null}}'
)
UNAVAILABLE_BODY = (
    b'{"error":{"message":"The model is currently unavailable. Please try again later.",'
    b'"type":"bad_gateway","param":null,"code":null}}'
)


class ContractError(Exception):
    """A response that breaks the gateway's contract."""


# Traffic.


@dataclass
class Stack:
    """The gateway under test, its providers and the client."""

    gateway: RunningGateway
    healthy: DemoServer
    failing: DemoServer
    http: aiohttp.ClientSession
    healthy_key: str
    failing_key: str
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0

    async def post_chat(self, *, pubkey: str | None, stream: bool) -> tuple[int, bytes]:
        headers = {} if pubkey is None else {"X-Model-Pub-Key": pubkey}
        body = orjson.dumps({"model": MODEL, "stream": stream, "messages": []})
        url = self.gateway.url + "/v1/chat/completions"
        async with self.http.post(url, data=body, headers=headers) as response:
            return response.status, await response.read()

    async def heartbeat(self, pubkey: str, url: str, ttl_s: float) -> int:
        body = {"pubkey": pubkey, "model": MODEL, "url": url, "signing_algo": "ed25519"}
        async with self.http.post(
            self.gateway.admin_url + "/v1/providers/heartbeat",
            data=orjson.dumps({**body, "ttl_s": ttl_s}),
            headers={"Authorization": f"Bearer {PROVIDER_TOKEN}"},
        ) as response:
            await response.read()
            return response.status

    async def deregister(self, pubkey: str) -> int:
        async with self.http.delete(
            self.gateway.admin_url + f"/v1/providers/{pubkey}",
            headers={"Authorization": f"Bearer {PROVIDER_TOKEN}"},
        ) as response:
            await response.read()
            return response.status


async def pinned_stream(stack: Stack) -> str:
    status, body = await stack.post_chat(pubkey=stack.healthy_key, stream=True)
    if status != 200 or not body.endswith(b"data: [DONE]\n\n"):
        raise ContractError(f"pinned stream: {status} {body[-120:]!r}")
    return "stream_200"


async def unpinned_json(stack: Stack) -> str:
    status, body = await stack.post_chat(pubkey=None, stream=False)
    if status != 200 or not body.startswith(b"{"):
        raise ContractError(f"unpinned completion: {status} {body[:120]!r}")
    return "json_200"


async def stale_key(stack: Stack) -> str:
    status, body = await stack.post_chat(pubkey=secrets.token_hex(32), stream=True)
    if status != 421 or body != STALE_KEY_BODY:
        raise ContractError(f"stale key: {status} {body[:160]!r}")
    return "stale_421"


async def failing_provider(stack: Stack) -> str:
    status, body = await stack.post_chat(pubkey=stack.failing_key, stream=True)
    if status != 502 or body != UNAVAILABLE_BODY:
        raise ContractError(f"failing provider: {status} {body[:160]!r}")
    return "failing_502"


async def short_lease(stack: Stack) -> str:
    """Register a key for one second; a fifth of them deregister at once, the rest expire."""
    key = secrets.token_hex(32)
    status = await stack.heartbeat(key, stack.healthy.url, ttl_s=1)
    if status != 200:
        raise ContractError(f"heartbeat: {status}")
    if random.random() < 0.2:
        status = await stack.deregister(key)
        if status != 204:
            raise ContractError(f"deregister: {status}")
        return "heartbeat_deregistered"
    return "heartbeat_expiring"


MIX: list[tuple[Callable[[Stack], Awaitable[str]], int]] = [
    (pinned_stream, 45),
    (unpinned_json, 10),
    (stale_key, 15),
    (failing_provider, 10),
    (short_lease, 20),
]


async def one_request(stack: Stack, slots: asyncio.Semaphore) -> None:
    kinds, weights = zip(*MIX, strict=True)
    kind = random.choices(kinds, weights)[0]
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            outcome = await kind(stack)
    except (ContractError, TimeoutError, aiohttp.ClientError) as exc:
        stack.violation_count += 1
        if len(stack.violations) < 10:
            stack.violations.append(f"{kind.__name__}: {type(exc).__name__}: {exc}")
        outcome = "violation"
    finally:
        slots.release()
    stack.outcomes[outcome] += 1


async def keep_registered(stack: Stack) -> None:
    """Renew the two long-lived keys every second (5 s leases), as their agents would."""
    while True:
        endpoints = ((stack.healthy_key, stack.healthy.url), (stack.failing_key, stack.failing.url))
        for key, url in endpoints:
            status = await stack.heartbeat(key, url, ttl_s=5)
            if status != 200:
                stack.violation_count += 1
                stack.violations.append(f"keep-alive heartbeat: {status}")
        await asyncio.sleep(KEEPALIVE_INTERVAL_S)


async def drive(stack: Stack, rate: float, deadline: float, tasks: set[asyncio.Task[None]]) -> int:
    """Start requests at ``rate`` per second until ``deadline``; return how many were skipped."""
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)
    skipped = 0
    started = time.monotonic()
    sent = 0
    while time.monotonic() < deadline:
        sent += 1
        await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
        if slots.locked():
            skipped += 1
            continue
        await slots.acquire()
        task = asyncio.create_task(one_request(stack, slots), name="soak-request")
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return skipped


# Reports.


def measure(stack: Stack, lag: LagMonitor, started: float) -> Report:
    lag_max, lag_p99 = lag.take()
    return Report(
        elapsed_s=time.monotonic() - started,
        rss_kib=rss_kib(),
        fds=open_fds(),
        tasks=len(asyncio.all_tasks()),
        lag_max_ms=lag_max,
        lag_p99_ms=lag_p99,
        answers=sum(stack.outcomes.values()),
    )


async def report_forever(stack: Stack, lag: LagMonitor, started: float, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        print(measure(stack, lag, started).line(), flush=True)


async def report_at_rest(
    stack: Stack, lag: LagMonitor, started: float, requests: set[asyncio.Task[None]]
) -> Report:
    """Measure once no request is in flight and idle pooled connections have closed.

    aiohttp closes an idle pooled connection at the first cleanup pass after its
    keep-alive ends, up to two keep-alive periods after its last use, so the process
    is sampled over that window and each figure is its least value: what stays held.
    """
    if requests:
        await asyncio.wait(requests, timeout=REQUEST_TIMEOUT_S + 1)
    samples = []
    deadline = time.monotonic() + 2 * UPSTREAM_KEEPALIVE_S + 2
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        samples.append(measure(stack, lag, started))
    return Report(
        elapsed_s=samples[-1].elapsed_s,
        rss_kib=min(sample.rss_kib for sample in samples),
        fds=min(sample.fds for sample in samples),
        tasks=min(sample.tasks for sample in samples),
        lag_max_ms=max(sample.lag_max_ms for sample in samples),
        lag_p99_ms=max(sample.lag_p99_ms for sample in samples),
        answers=samples[-1].answers,
    )


# The run.


def write_tokens(directory: Path) -> tuple[Path, Path]:
    provider_tokens = directory / "provider-tokens"
    provider_tokens.write_text(f"soak {PROVIDER_TOKEN}\n", encoding="utf-8")
    admin_token = directory / "admin-token"
    admin_token.write_text(ADMIN_TOKEN + "\n", encoding="utf-8")
    return provider_tokens, admin_token


async def soak(args: argparse.Namespace, redis: RedisProcess, directory: Path) -> int:
    provider_tokens, admin_token = write_tokens(directory)
    settings = Settings(
        port=0,
        admin_port=0,
        registry_url=redis.url,
        provider_tokens_file=str(provider_tokens),
        admin_token_file=str(admin_token),
        allowed_provider_hosts=("127.0.0.1/32",),
        require_attestation_match=False,
        heartbeat_ttl_min_s=1,
        reap_interval_s=0.5,
        connect_timeout_s=1,
        first_byte_timeout_s=5,
        idle_timeout_s=5,
        request_timeout_s=5,
        retry_backoff_s=0.01,
        upstream_keepalive_s=UPSTREAM_KEEPALIVE_S,
    )
    watch = LogWatch()
    logging.getLogger().addHandler(watch)
    logging.getLogger().setLevel(logging.INFO)
    lag = LagMonitor()
    lag_task = asyncio.create_task(lag.run(), name="soak-lag-monitor")
    requests: set[asyncio.Task[None]] = set()

    async with contextlib.AsyncExitStack() as stack_exit:
        healthy = await stack_exit.enter_async_context(
            serve_demo_provider(DemoConfig(model=MODEL, events=16, event_delay_s=0.005))
        )
        failing = await stack_exit.enter_async_context(
            serve_demo_provider(DemoConfig(model=MODEL, status=500))
        )
        gateway = await start_gateway(settings)
        stack_exit.push_async_callback(gateway.stop)
        # One connection per request: kept-alive client connections would make the
        # gateway's task and descriptor counts depend on the peak concurrency.
        http = await stack_exit.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        )
        stack = Stack(
            gateway,
            healthy,
            failing,
            http,
            healthy.config.keys.public_key_hex("ed25519"),
            failing.config.keys.public_key_hex("ed25519"),
        )
        keeper = asyncio.create_task(keep_registered(stack), name="soak-keep-registered")
        await asyncio.sleep(0.5)

        # Warm up, measure at rest, run, measure at rest again: at rest, no request is
        # in flight and idle pooled connections have closed, so what remains is growth.
        started = time.monotonic()
        reporter = asyncio.create_task(
            report_forever(stack, lag, started, args.report_interval_s),
            name="soak-reporter",
        )
        skipped = await drive(stack, args.rate, started + args.warmup_s, requests)
        baseline = await report_at_rest(stack, lag, started, requests)
        print(f"baseline {baseline.line()}", flush=True)
        skipped += await drive(stack, args.rate, started + args.duration_s, requests)
        final = await report_at_rest(stack, lag, started, requests)
        print(f"final    {final.line()}", flush=True)

        for task in (reporter, keeper):
            task.cancel("soak over")
            with contextlib.suppress(asyncio.CancelledError):
                await task
    lag_task.cancel("soak over")
    with contextlib.suppress(asyncio.CancelledError):
        await lag_task
    logging.getLogger().removeHandler(watch)

    limits = Limits(args.max_rss_growth, args.max_fd_growth, args.max_task_growth)
    failures = check(baseline, final, limits)
    if stack.violation_count:
        failures.append(f"{stack.violation_count} answers broke the contract: {stack.violations}")
    if watch.fault_count:
        failures.append(f"{watch.fault_count} records at ERROR or with a traceback: {watch.faults}")

    answers = dict(sorted(stack.outcomes.items()))
    print(f"answers: {answers}; not started (at {MAX_IN_FLIGHT} in flight): {skipped}")
    print(f"log records by level: {dict(watch.levels)}")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("soak passed" if not failures else "soak FAILED")
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600.0, help="how long traffic runs")
    parser.add_argument("--rate", type=float, default=30.0, help="requests started per second")
    parser.add_argument(
        "--report-interval-s", type=float, default=30.0, help="seconds between report lines"
    )
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="the first report after this many seconds is the baseline "
        "(default: a quarter of the duration, at most 60)",
    )
    parser.add_argument(
        "--max-rss-growth", type=float, default=0.20, help="allowed RSS growth over the baseline"
    )
    parser.add_argument(
        "--max-fd-growth", type=int, default=10, help="allowed growth of open descriptors"
    )
    parser.add_argument(
        "--max-task-growth", type=int, default=10, help="allowed growth of asyncio tasks"
    )
    args = parser.parse_args(argv)
    if args.warmup_s is None:
        args.warmup_s = min(60.0, args.duration_s / 4)
    if args.duration_s <= 0 or args.rate <= 0 or args.report_interval_s <= 0:
        parser.error("--duration-s, --rate and --report-interval-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The gateway's INFO lines (one access line per request) would flood the terminal.
    logging.getLogger().handlers[0].setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="e2ee-soak-") as directory:
        redis = start_redis(Path(directory) / "redis")
        try:
            return asyncio.run(soak(args, redis, Path(directory)))
        finally:
            redis.stop()


if __name__ == "__main__":
    sys.exit(main())
