"""Resource figures of the soak run: RSS, descriptors, log faults, event-loop lag, limits."""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class LogWatch(logging.Handler):
    """Counts records by level and keeps the first few faults: ERROR or a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.levels: Counter[str] = Counter()
        self.faults: list[str] = []
        self.fault_count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.levels[record.levelname] += 1
        if record.levelno >= logging.ERROR or record.exc_info is not None:
            self.fault_count += 1
            if len(self.faults) < 10:
                self.faults.append(f"{record.name}: {record.getMessage()}")


class LagMonitor:
    """Measures how late a 100 ms sleep wakes up: the event loop's scheduling lag."""

    def __init__(self, period_s: float = 0.1) -> None:
        self._period_s = period_s
        self.samples_ms: list[float] = []

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(self._period_s)
            self.samples_ms.append((time.monotonic() - started - self._period_s) * 1000)

    def take(self) -> tuple[float, float]:
        """Return (max, p99) of the lag since the last call, in milliseconds."""
        samples, self.samples_ms = self.samples_ms, []
        if len(samples) < 2:
            return (samples[0], samples[0]) if samples else (0.0, 0.0)
        return max(samples), statistics.quantiles(samples, n=100)[98]


@dataclass(frozen=True, slots=True)
class Report:
    elapsed_s: float
    rss_kib: int
    fds: int
    tasks: int
    lag_max_ms: float
    lag_p99_ms: float
    answers: int

    def line(self) -> str:
        return (
            f"t={self.elapsed_s:6.0f}s rss={self.rss_kib / 1024:7.1f} MiB fds={self.fds:4d} "
            f"tasks={self.tasks:4d} lag_max={self.lag_max_ms:6.1f} ms "
            f"lag_p99={self.lag_p99_ms:6.1f} ms answers={self.answers}"
        )


@dataclass(frozen=True, slots=True)
class Limits:
    max_rss_growth: float
    max_fd_growth: int
    max_task_growth: int


def check(baseline: Report, final: Report, limits: Limits) -> list[str]:
    """Return the growth limits that ``final`` exceeds over ``baseline``."""
    failures = []
    rss_growth = (final.rss_kib - baseline.rss_kib) / baseline.rss_kib
    if rss_growth > limits.max_rss_growth:
        failures.append(f"RSS grew {rss_growth:.1%} (limit {limits.max_rss_growth:.0%})")
    if final.fds - baseline.fds > limits.max_fd_growth:
        failures.append(
            f"open descriptors grew by {final.fds - baseline.fds} (limit {limits.max_fd_growth})"
        )
    if final.tasks - baseline.tasks > limits.max_task_growth:
        failures.append(
            f"asyncio tasks grew by {final.tasks - baseline.tasks} "
            f"(limit {limits.max_task_growth})"
        )
    return failures
