"""Sampling the gateway with py-spy during an S1 load run, and summarising the stacks.

py-spy runs out of process on the load generator's CPU. With ``native=True`` it also
records C frames: libc system calls, CPython's garbage collector, uvloop and aiohttp's
C parser. That mode pauses the gateway for each sample, so the profiled run is not one
of the measured ones. Without it, ``--nonblocking`` samples Python frames only.

The summary counts, per function, the samples where it is the innermost frame (self)
and, for Python functions, where it is anywhere on the stack (inclusive), and sorts the
self samples into areas of the code by file path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PY_SPY_RATE_HZ = 200

# Areas by file path fragment, checked in order; the first match wins. Without native
# frames, self time in Runner.run is time spent in uvloop's C code.
_AREAS = (
    ("libc.so", "libc, mostly system calls"),
    ("libpython", "CPython runtime (garbage collector, allocator)"),
    (".h)", "CPython runtime (garbage collector, allocator)"),
    ("asyncio/runners.py", "event loop (uvloop C code)"),
    ("proxy/", "gateway code (proxy/)"),
    ("registry/", "registry code (registry/)"),
    ("aiohttp/web", "aiohttp server"),
    ("aiohttp/http", "aiohttp HTTP parser and writer"),
    ("_http_parser", "aiohttp HTTP parser and writer"),
    ("_http_writer", "aiohttp HTTP parser and writer"),
    ("aiohttp/client", "aiohttp client"),
    ("aiohttp/connector", "aiohttp client"),
    ("aiohttp/streams", "aiohttp streams"),
    ("aiohttp/", "aiohttp, other"),
    ("multidict", "multidict"),
    ("yarl", "yarl"),
    ("logging/", "logging"),
    ("prometheus_client", "prometheus_client"),
    ("redis/", "redis-py"),
    ("_asynciomodule.c", "asyncio"),
    ("asyncio/", "asyncio"),
    ("uvloop", "uvloop and libuv"),
    ("loop.c", "uvloop and libuv"),
    ("core.c", "uvloop and libuv"),
    ("linux.c", "uvloop and libuv"),
    ("stream.c", "uvloop and libuv"),
)

# Frames that enclose everything the process does: left out of the inclusive table.
_ENTRY_FRAGMENTS = ("runpy", "proxy/__main__.py", "uvloop/__init__.py", "asyncio/runners.py")


def py_spy_path() -> str | None:
    """Return py-spy from the running interpreter's environment or PATH, if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(
    py_spy: str,
    pin: Sequence[str],
    pid: int,
    duration_s: float,
    output: Path,
    load: Callable[[], object],
    *,
    native: bool,
) -> None:
    """Sample ``pid`` for ``duration_s`` while ``load`` runs, writing collapsed stacks.

    Raises RuntimeError when py-spy fails or writes nothing.
    """
    argv = [
        *pin,
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(duration_s))),
        "--rate",
        str(PY_SPY_RATE_HZ),
        "--native" if native else "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    result: dict[str, subprocess.CompletedProcess[str]] = {}

    def sample() -> None:
        result["py-spy"] = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )

    # A daemon thread, so that an interrupted run does not wait for py-spy to finish.
    sampler = threading.Thread(target=sample, name="py-spy", daemon=True)
    sampler.start()
    load()
    sampler.join(duration_s + 90)
    completed = result.get("py-spy")
    if completed is None or completed.returncode != 0 or not output.exists():
        detail = completed.stderr.strip()[-500:] if completed is not None else "no result"
        raise RuntimeError(f"py-spy failed: {detail}")


@dataclass(frozen=True, slots=True)
class Profile:
    """Sample counts by function (self and inclusive) and by area (self)."""

    samples: int
    self_by_function: list[tuple[str, int]]
    inclusive_by_function: list[tuple[str, int]]
    self_by_area: list[tuple[str, int]]
    python_callers: dict[str, list[tuple[str, int]]]
    """For each C function among the top self ones, its nearest Python callers."""


def _function(frame: str) -> str:
    """Return ``name (path)`` of a py-spy frame ``name (path:line)``, the line dropped."""
    name, _, where = frame.partition(" (")
    if name.startswith("0x"):
        name = "<unresolved>"
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.rsplit("/main/", 1)[-1]
    return f"{name} ({path})"


def _area(function: str) -> str:
    for fragment, area in _AREAS:
        if fragment in function:
            return area
    return "other"


def _counts_as_inclusive(function: str) -> bool:
    """Return whether a function belongs in the inclusive table: Python code, not an entry."""
    python = ".py)" in function or "(<frozen" in function
    return python and not any(fragment in function for fragment in _ENTRY_FRAGMENTS)


def summarise(collapsed: Path, top: int = 15) -> Profile:
    """Read py-spy's raw output (``frame;frame;... count``, outermost first) and count."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    callers: dict[str, Counter[str]] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        functions = [_function(frame) for frame in stack.split(";") if " (" in frame]
        if not functions:
            continue
        total += count
        self_counts[functions[-1]] += count
        areas[_area(functions[-1])] += count
        for function in set(functions):
            if _counts_as_inclusive(function):
                inclusive[function] += count
        python = [f for f in functions if _counts_as_inclusive(f)]
        if python and not _counts_as_inclusive(functions[-1]):
            callers.setdefault(functions[-1], Counter())[python[-1]] += count
    top_self = self_counts.most_common(top)
    return Profile(
        total,
        top_self,
        inclusive.most_common(top),
        areas.most_common(),
        {name: callers[name].most_common(3) for name, _ in top_self[:8] if name in callers},
    )
