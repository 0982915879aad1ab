"""Running the load generators: wrk for S1 and S2, the asyncio client for S3 and S4.

Each run is bounded: wrk stops after its duration, the client after its duration or
hold, and every subprocess call has a timeout on top. CPU time of wrk comes from
``getrusage(RUSAGE_CHILDREN)`` around it (it is the only child reaped meanwhile); the
client reports its own.
"""

from __future__ import annotations

import math
import os
import resource
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.bench.stack import REPO_ROOT

WRK_TIMEOUT_S = 5
STREAM_TIMEOUT_S = 30.0
"""The client's limit for one S3 stream, about 50 times its normal length."""
MARGIN_S = 30.0

_WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
{headers}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%.1f,"p99_us":%.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one load run measured, as the load generator saw it."""

    completed: int
    errors: dict[str, int]
    elapsed_s: float
    load_cpu_s: float
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    ttfb_p50_ms: float = math.nan
    ttfb_p99_ms: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def write_wrk_script(path: Path, body: str, headers: dict[str, str]) -> Path:
    lines = "\n".join(f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items())
    path.write_text(_WRK_SCRIPT.format(body=body, headers=lines))
    return path


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    pin: Sequence[str], url: str, script: Path, *, connections: int, duration_s: float
) -> LoadResult:
    """Run wrk with one thread for ``duration_s`` and return its counts and latencies."""
    argv = [
        *pin,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        f"{WRK_TIMEOUT_S}s",
        "-s",
        str(script),
        url,
    ]
    cpu_before = _children_cpu_s()
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + MARGIN_S, check=False
    )
    cpu = _children_cpu_s() - cpu_before
    line = next((x for x in completed.stdout.splitlines() if x.startswith("BENCH ")), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed (exit {completed.returncode}): {completed.stderr.strip()[:500]}"
        )
    data = orjson.loads(line.removeprefix("BENCH "))
    errors = {k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout") if data[k]}
    return LoadResult(
        # wrk counts non-2xx responses in "requests" and again in errors.status.
        completed=int(data["requests"]) - int(data["status"]),
        errors=errors,
        elapsed_s=data["duration_us"] / 1e6,
        load_cpu_s=cpu,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


def _client_argv(
    pin: Sequence[str],
    port: int,
    path: str,
    body: str,
    headers: dict[str, str],
    timeout_s: float,
) -> list[str]:
    argv = [*pin, sys.executable, "-m", "tests.bench.client", "--port", str(port)]
    argv += ["--path", path, "--body", body, "--timeout-s", str(timeout_s)]
    for name, value in headers.items():
        argv += ["--header", f"{name}: {value}"]
    return argv


def run_client_streams(
    pin: Sequence[str],
    port: int,
    path: str,
    body: str,
    headers: dict[str, str],
    *,
    concurrency: int,
    duration_s: float,
) -> LoadResult:
    """Run the client's ``streams`` command and return TTFB and total per stream."""
    argv = _client_argv(pin, port, path, body, headers, STREAM_TIMEOUT_S)
    argv += ["streams", "--concurrency", str(concurrency), "--duration-s", str(duration_s)]
    completed = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration_s + STREAM_TIMEOUT_S + MARGIN_S,
        check=False,
        cwd=REPO_ROOT,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the client failed: {completed.stderr.strip()[-800:]}")
    data = orjson.loads(completed.stdout.strip().splitlines()[-1])
    return LoadResult(
        completed=data["completed"],
        errors=data["errors"],
        elapsed_s=data["elapsed_s"],
        load_cpu_s=data["client_cpu_s"],
        p50_ms=data["total_ms"]["p50"],
        p99_ms=data["total_ms"]["p99"],
        ttfb_p50_ms=data["ttfb_ms"]["p50"],
        ttfb_p99_ms=data["ttfb_ms"]["p99"],
    )


def run_client_idle(
    pin: Sequence[str],
    port: int,
    path: str,
    body: str,
    headers: dict[str, str],
    *,
    streams: int,
    rate: float,
    hold_s: float,
    first_event_timeout_s: float,
    on_ready: Callable[[dict[str, Any]], None],
) -> LoadResult:
    """Run the client's ``idle`` command; call ``on_ready`` once every stream is open.

    ``on_ready`` runs while the streams are held, so it may take up to ``hold_s``.
    """
    argv = _client_argv(pin, port, path, body, headers, first_event_timeout_s)
    argv += ["idle", "--streams", str(streams), "--rate", str(rate), "--hold-s", str(hold_s)]
    deadline = time.monotonic() + streams / rate + first_event_timeout_s + hold_s + MARGIN_S
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    try:
        assert process.stdout is not None
        records: list[dict[str, Any]] = []
        while len(records) < 2:
            line = _read_line(process, deadline)
            record = orjson.loads(line)
            records.append(record)
            if record["phase"] == "ready":
                on_ready(record)
        process.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    done = records[-1]
    return LoadResult(
        completed=done["opened"],
        errors=done["errors"],
        elapsed_s=done["open_s"] + hold_s,
        load_cpu_s=done["client_cpu_s"],
        ttfb_p50_ms=done["ttfb_ms"]["p50"],
        ttfb_p99_ms=done["ttfb_ms"]["p99"],
        extra={"ready": records[0]},
    )


def _read_line(process: subprocess.Popen[bytes], deadline: float) -> bytes:
    """Return the next stdout line of ``process``; raise TimeoutError after ``deadline``."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    buffer = b""
    while not buffer.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client printed nothing before its deadline")
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 1)
        if not chunk:
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"the client exited early: {stderr.strip()[-800:]}")
        buffer += chunk
    return buffer
