"""The four scenarios, each measured against every target in one interleaved run.

S1 small JSON (wrk), S2 64-event streams (wrk), S3 256 events 2 ms apart (asyncio
client, TTFB and total), S4 idle streams held open (RSS per stream and errors). Every
measurement brackets the load run with samples of the proxy's and the fake provider's
process trees and of the benchmark redis-server's ``INFO commandstats``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from proxy.config import Settings
from tests.bench.load import (
    LoadResult,
    run_client_idle,
    run_client_streams,
    run_wrk,
    write_wrk_script,
)
from tests.bench.procs import Usage, sample
from tests.bench.stack import Stack, redis_command_calls
from tests.bench.upstream import MODEL

logger = logging.getLogger(__name__)

JSON_PATH = "/v1/chat/completions"
JSON_BODY = (
    f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"Say hello in five words."}}]}}'
)
STREAM_BODY = (
    f'{{"model":"{MODEL}","stream":true,"messages":[{{"role":"user","content":"Tell a story."}}]}}'
)
S2_PATH = "/v1/chat/completions?kind=sse&events=64"
S3_PATH = "/v1/chat/completions?kind=sse&events=256&delay_ms=2"
# The first event goes out at once, because the gateway sends no response headers before
# it. Then one follows every 10 s, so the streams stay open and nearly idle while held.
S4_PATH = "/v1/chat/completions?kind=sse&events=1000&delay_ms=10000"
WARMUP_PATH = "/v1/chat/completions?kind=sse&events=8"
RELEASE_TIMEOUT_S = 30.0
COMPLETION_RECORD_COMMANDS = ("set", "evalsha")
"""Commands of the completion records: the script call and the SETs it runs."""

DEFAULT_MAX_CONNECTIONS = Settings().max_connections_per_provider
"""The gateway's default GATEWAY_MAX_CONNECTIONS_PER_PROVIDER: more streams wait for one."""
RAISED_MAX_CONNECTIONS = 8192


@dataclass(frozen=True, slots=True)
class Target:
    """Where the load goes: the fake provider directly, nginx or the gateway."""

    name: str
    kind: str
    pinned: bool = True
    gateway_env: tuple[tuple[str, str], ...] = ()


DIRECT = Target("direct", "direct")
NGINX = Target("nginx", "nginx")
GATEWAY = Target("gateway", "gateway")
GATEWAY_UNPINNED = Target("gateway unpinned", "gateway", pinned=False)
NAIVE = Target("naive aiohttp", "naive")
"""The reference pass-through of tests/bench/naive.py: what Python proxies usually cost."""
GATEWAY_RAISED = Target(
    f"gateway, {RAISED_MAX_CONNECTIONS} conns/provider",
    "gateway",
    gateway_env=(("GATEWAY_MAX_CONNECTIONS_PER_PROVIDER", str(RAISED_MAX_CONNECTIONS)),),
)


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """Durations and sizes of one benchmark run; ``quick()`` gives the short variant."""

    repetitions: int = 3
    duration_s: float = 8.0
    warmup_s: float = 1.0
    s4_levels: tuple[int, ...] = (1000, 5000)
    s4_rate: float = 500.0
    s4_hold_s: float = 10.0
    s4_first_event_timeout_s: float = 10.0
    profile_s: float = 8.0

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(
            repetitions=1,
            duration_s=3.0,
            warmup_s=1.0,
            s4_rate=1000.0,
            s4_hold_s=2.0,
            s4_first_event_timeout_s=3.0,
            profile_s=3.0,
        )


@dataclass(slots=True)
class Measurement:
    """One load run against one target, with the server-side deltas around it."""

    scenario: str
    target: str
    repetition: int
    load: LoadResult
    window_s: float
    proxy_cpu_s: float
    upstream_cpu_s: float
    redis_calls: dict[str, int]
    redis_background: float
    extra: dict[str, float] = field(default_factory=dict)

    def per_request_us(self, cpu_s: float) -> float:
        if self.load.completed == 0 or math.isnan(cpu_s):
            return math.nan
        return cpu_s / self.load.completed * 1e6

    @property
    def redis_per_request(self) -> float:
        """Redis commands per completed request, less the background rate."""
        if self.load.completed == 0:
            return math.nan
        total = sum(self.redis_calls.values()) - self.redis_background
        return max(0.0, total) / self.load.completed

    @property
    def redis_routing_per_request(self) -> float:
        """Redis commands per completed request other than the completion records.

        The records for signature fetches are the only writes the gateway sends while it
        serves requests: one script call per batch of chat completions, off the relay's
        path, with one SET inside it per record. Heartbeats and the reaper are in the
        background rate, so every other command counted here is spent on routing.
        """
        if self.load.completed == 0:
            return math.nan
        records = sum(self.redis_calls.get(name, 0) for name in COMPLETION_RECORD_COMMANDS)
        total = sum(self.redis_calls.values()) - records - self.redis_background
        return max(0.0, total) / self.load.completed

    @property
    def load_cpu_percent(self) -> float:
        return 100 * self.load.load_cpu_s / self.load.elapsed_s if self.load.elapsed_s else math.nan


class Bench:
    """Runs the scenarios on a started ``Stack`` and collects Measurements."""

    def __init__(self, stack: Stack, settings: BenchSettings, tmp: Path) -> None:
        self.stack = stack
        self.settings = settings
        self.tmp = tmp
        self.measurements: list[Measurement] = []
        self.redis_background_per_s = 0.0

    # Targets

    def port(self, target: Target) -> int:
        stack = self.stack
        ports = {
            "direct": stack.upstream_port,
            "nginx": stack.nginx_port,
            "naive": stack.naive_port,
        }
        return ports.get(target.kind, stack.gateway_port)

    def proxy_pid(self, target: Target) -> int | None:
        stack = self.stack
        process = {"nginx": stack.nginx, "gateway": stack.gateway, "naive": stack.naive}.get(
            target.kind
        )
        return None if process is None else process.pid

    def headers(self, target: Target) -> dict[str, str]:
        if target.kind in ("gateway", "naive") and target.pinned:
            return {"X-Model-Pub-Key": self.stack.pubkey}
        return {}

    def _upstream_pid(self) -> int:
        assert self.stack.upstream is not None
        return self.stack.upstream.pid

    def _redis_pid(self) -> int:
        assert self.stack.redis is not None
        return self.stack.redis.pid

    # Measuring

    def measure_redis_background(self, seconds: float = 2.0) -> None:
        """Record the Redis command rate of an idle gateway (reaper, health checks)."""
        before = redis_command_calls(self.stack.redis_port)
        time.sleep(seconds)
        after = redis_command_calls(self.stack.redis_port)
        total = sum(after.values()) - sum(before.values())
        self.redis_background_per_s = total / seconds

    def measure(
        self, scenario: str, target: Target, repetition: int, run: Callable[[], LoadResult]
    ) -> Measurement:
        """Run ``run`` and record the CPU and Redis deltas of the system under test."""
        proxy_pid = self.proxy_pid(target)
        redis_pid = self._redis_pid()
        redis_before = redis_command_calls(self.stack.redis_port)
        upstream_before = sample(self._upstream_pid())
        redis_cpu_before = sample(redis_pid).cpu_s
        proxy_before = sample(proxy_pid) if proxy_pid is not None else None
        started = time.monotonic()

        load = run()

        window_s = time.monotonic() - started
        proxy_cpu = math.nan
        if proxy_pid is not None and proxy_before is not None:
            proxy_cpu = sample(proxy_pid).cpu_s - proxy_before.cpu_s
        upstream_cpu = sample(self._upstream_pid()).cpu_s - upstream_before.cpu_s
        redis_cpu = sample(redis_pid).cpu_s - redis_cpu_before
        redis_after = redis_command_calls(self.stack.redis_port)
        calls = {
            name: count - redis_before.get(name, 0)
            for name, count in redis_after.items()
            if count != redis_before.get(name, 0)
        }
        measurement = Measurement(
            scenario,
            target.name,
            repetition,
            load,
            window_s,
            proxy_cpu,
            upstream_cpu,
            calls,
            self.redis_background_per_s * window_s,
        )
        # The share of CPU 0 (proxy, provider and redis-server) used during the run.
        server_cpu = upstream_cpu + redis_cpu + (0.0 if math.isnan(proxy_cpu) else proxy_cpu)
        measurement.extra["server_cpu_pct"] = 100 * server_cpu / window_s
        self.measurements.append(measurement)
        logger.info(
            "%s %-18s rep %d: %d done, %d errors, %.0f/s, proxy %.0f us/req, load CPU %.0f%%",
            scenario,
            target.name,
            repetition,
            load.completed,
            load.error_count,
            load.completed / load.elapsed_s if load.elapsed_s else 0.0,
            measurement.per_request_us(proxy_cpu),
            measurement.load_cpu_percent,
        )
        return measurement

    def _interleaved(
        self, scenario: str, targets: list[Target], run: Callable[[Target, float], LoadResult]
    ) -> None:
        """Warm every target up, then run the repetitions in rotating target order."""
        for target in targets:
            run(target, self.settings.warmup_s)
        duration_s = self.settings.duration_s
        for repetition in range(self.settings.repetitions):
            shift = repetition % len(targets)
            for target in targets[shift:] + targets[:shift]:
                self.measure(scenario, target, repetition, partial(run, target, duration_s))

    # Scenarios

    def wrk_run(self, target: Target, path: str, body: str, duration_s: float) -> LoadResult:
        slug = target.name.replace(" ", "-").replace(",", "").replace("/", "-")
        script = write_wrk_script(self.tmp / f"wrk-{slug}.lua", body, self.headers(target))
        url = f"http://127.0.0.1:{self.port(target)}{path}"
        return run_wrk(self.stack.pinning.load, url, script, connections=32, duration_s=duration_s)

    def s1_small_json(self) -> None:
        targets = [DIRECT, NGINX, GATEWAY, GATEWAY_UNPINNED, NAIVE]
        self._interleaved("S1", targets, lambda t, d: self.wrk_run(t, JSON_PATH, JSON_BODY, d))

    def s2_streams(self) -> None:
        targets = [DIRECT, NGINX, GATEWAY, NAIVE]
        self._interleaved("S2", targets, lambda t, d: self.wrk_run(t, S2_PATH, STREAM_BODY, d))

    def s3_paced_streams(self) -> None:
        def run(target: Target, duration_s: float) -> LoadResult:
            return run_client_streams(
                self.stack.pinning.load,
                self.port(target),
                S3_PATH,
                STREAM_BODY,
                self.headers(target),
                concurrency=64,
                duration_s=duration_s,
            )

        self._interleaved("S3", [DIRECT, NGINX, GATEWAY, NAIVE], run)

    def s4_idle_streams(self) -> None:
        for level in self.settings.s4_levels:
            targets = [DIRECT, NGINX, GATEWAY]
            if level > DEFAULT_MAX_CONNECTIONS:
                targets.append(GATEWAY_RAISED)
            for target in targets:
                self._s4_one(level, target)
        # Leave the gateway in its default configuration for whatever follows.
        self.stack.start_gateway()

    def _s4_one(self, level: int, target: Target) -> None:
        """Open ``level`` streams through a freshly started target and measure its RSS."""
        settings = self.settings
        if target.kind == "nginx":
            self.stack.start_nginx()
        elif target.kind == "gateway":
            self.stack.start_gateway(dict(target.gateway_env))
        # The process whose memory is measured: the proxy, or the provider when direct.
        pid = self.proxy_pid(target) or self._upstream_pid()
        port = self.port(target)
        headers = self.headers(target)
        pin = self.stack.pinning.load

        # Warm up, so that imports and pools made by the first requests are not counted.
        run_client_streams(
            pin, port, WARMUP_PATH, STREAM_BODY, headers, concurrency=16, duration_s=1.0
        )
        time.sleep(0.5)
        idle = sample(pid)
        held: list[Usage] = []

        def on_ready(_: object) -> None:
            time.sleep(settings.s4_hold_s / 2)
            held.append(sample(pid))

        measurement = self.measure(
            f"S4-{level}",
            target,
            0,
            lambda: run_client_idle(
                pin,
                port,
                S4_PATH,
                STREAM_BODY,
                headers,
                streams=level,
                rate=settings.s4_rate,
                hold_s=settings.s4_hold_s,
                first_event_timeout_s=settings.s4_first_event_timeout_s,
                on_ready=on_ready,
            ),
        )
        released = self._wait_for_release(pid, idle.open_fds)
        opened = measurement.load.completed
        open_usage = held[0] if held else idle
        measurement.extra.update(
            {
                "streams": float(level),
                "rss_idle_kib": float(idle.rss_kib),
                "rss_open_kib": float(open_usage.rss_kib),
                "kib_per_stream": (open_usage.rss_kib - idle.rss_kib) / opened
                if opened
                else math.nan,
                "fds_open": float(open_usage.open_fds),
                "released": 1.0 if released else 0.0,
            }
        )

    def _wait_for_release(self, pid: int, idle_fds: int) -> bool:
        """Wait until the process closed the held streams' sockets; return whether it did."""
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while time.monotonic() < deadline:
            # Keep-alive pools may keep some upstream connections open: allow for them.
            if sample(pid).open_fds <= idle_fds + 300:
                return True
            time.sleep(0.5)
        logger.warning(
            "PID %d still holds many sockets %.0f s after the streams closed",
            pid,
            RELEASE_TIMEOUT_S,
        )
        return False
