"""Entry point of ``make bench``: the gateway against nginx and a direct connection.

Run from the repository root with ``python -m tests.bench.run [--quick]``. It checks
for nginx, wrk, redis-server and taskset, starts everything on 127.0.0.1 in a temporary
directory, runs S1-S4, prints the tables and rewrites docs/BENCHMARKS.md. Every phase
has a timeout, the whole run has ``--time-limit-s``, and each child is stopped by PID
in a ``finally``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import logging
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):
    # Run as a script (python tests/bench/run.py): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench import profile as py_spy
from tests.bench.procs import Children, Pinning
from tests.bench.report import Context, render
from tests.bench.scenarios import GATEWAY, JSON_BODY, JSON_PATH, Bench, BenchSettings
from tests.bench.stack import REPO_ROOT, HeartbeatRefresher, Stack

logger = logging.getLogger("tests.bench")

REQUIRED_TOOLS = {"nginx": "nginx", "wrk": "wrk", "redis-server": "redis-server"}


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


def _version(argv: Sequence[str]) -> str:
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not found"
    output = (completed.stdout + completed.stderr).strip().splitlines()
    return output[0] if output else "unknown"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git_revision() -> str:
    head = _version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return head + (" with uncommitted changes" if status.stdout.strip() else "")


def machine_facts() -> list[tuple[str, str]]:
    import aiohttp

    facts = [
        ("CPU", f"{_cpu_model()}, {os.cpu_count()} cores"),
        ("Kernel", platform.release()),
        ("Python", platform.python_version()),
        ("aiohttp", aiohttp.__version__),
    ]
    try:
        facts.append(("uvloop", importlib.metadata.version("uvloop")))
    except importlib.metadata.PackageNotFoundError:
        facts.append(("uvloop", "not installed (asyncio's default loop)"))
    facts += [
        ("nginx", _version(["nginx", "-v"]).removeprefix("nginx version: ")),
        ("wrk", _version(["wrk", "-v"]).split(" [")[0]),
        ("redis-server", _version(["redis-server", "--version"]).split(" sha=")[0]),
        ("Repository", _git_revision()),
    ]
    return facts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.run",
        description="Benchmark the gateway against nginx and a direct connection on 127.0.0.1.",
    )
    parser.add_argument("--quick", action="store_true", help="one short repetition (about 2 min)")
    parser.add_argument("--repetitions", type=int, help="repetitions per scenario (default 3)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument(
        "--nginx-access-log",
        choices=("on", "off"),
        default="on",
        help="nginx access log; on matches the gateway, which logs every request (default on)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO_ROOT / "docs" / "BENCHMARKS.md",
        help="Markdown file to rewrite (default docs/BENCHMARKS.md)",
    )
    parser.add_argument(
        "--time-limit-s",
        type=float,
        help="stop everything after this long (default 900, quick 240)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    return parser


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("the benchmark ran past --time-limit-s")


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by {signal.Signals(signum).name}")


def _setup_lines(pinning: Pinning, nginx_access_log: bool, settings: BenchSettings) -> list[str]:
    return [
        "Everything runs on 127.0.0.1: a fake provider (a raw asyncio HTTP/1.1 server on uvloop "
        "that writes each SSE event with its own write()), its own redis-server, nginx and "
        "the gateway.",
        f"CPU pinning: {pinning.note}.",
        "nginx: 1 worker process, `proxy_http_version 1.1`, `proxy_buffering off`, upstream "
        "keepalive 128, keepalive_requests 1000000, access log "
        + ("on (combined format, to a file)" if nginx_access_log else "off")
        + ".",
        "Gateway: `python -m proxy` in its default configuration (text logs at INFO with one "
        "access line per request, to a file; Prometheus metrics on) with "
        "`GATEWAY_REGISTRY_URL=redis://...`; only the ports, the provider tokens file and "
        "`GATEWAY_ALLOWED_PROVIDER_HOSTS=127.0.0.1/32` are set. The fake provider is registered "
        "by heartbeat (ttl_s 300, renewed every 30 s).",
        "naive aiohttp: tests/bench/naive.py, the simplest aiohttp pass-through (one Redis "
        "`HGET` per request, one shared ClientSession, the response relayed read by read; no "
        "logs, metrics, retries, timeouts or header filtering), as a reference for Python "
        "proxies.",
        f"Repetitions: {settings.repetitions} of {settings.duration_s:.0f} s per target and "
        "scenario, interleaved (the target order rotates per repetition), after a "
        f"{settings.warmup_s:.0f} s warm-up; figures are medians.",
        "Proxy CPU/request: utime + stime of the proxy's process tree (/proc/<pid>/stat) over "
        "the load run, divided by the requests completed. For `direct` there is no proxy.",
        "Redis cmds/req: `INFO commandstats` calls on the benchmark's redis-server over the "
        "run, less the idle rate measured before S1 (reaper, health checks), per request. "
        "It includes the completion records for signature fetches (one script call per "
        "batch of chat completions, off the relay's path, which Redis counts with the SET "
        "it runs per record); the routing targets count every command except those.",
        "Server CPU %: CPU time of the proxy, the fake provider and redis-server over the run, "
        "in % of one core; they share CPU 0 when pinned, so near 100 % the rate is CPU-bound.",
        "wrk / client CPU %: the load generator's own CPU time over the run; near 100 % the "
        "load generator, not the proxy, limits the rate.",
        f"S4: streams opened at {settings.s4_rate:.0f}/s, held {settings.s4_hold_s:.0f} s, "
        "the provider sends one event every 10 s; each target is restarted and warmed up "
        "before each level so that its RSS starts from the same point.",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    missing = missing_tools()
    if missing:
        print(
            f"bench: missing {', '.join(missing)}. Install with: "
            f"apt-get install -y {' '.join(REQUIRED_TOOLS[t] for t in missing)}",
            file=sys.stderr,
        )
        return 2
    if shutil.which("taskset") is None:
        print("bench: taskset is missing (apt-get install -y util-linux); running unpinned")

    settings = BenchSettings.quick() if args.quick else BenchSettings()
    if args.repetitions:
        settings = dataclasses.replace(settings, repetitions=args.repetitions)
    time_limit = args.time_limit_s or (240.0 if args.quick else 900.0)
    pinning = Pinning.detect(not args.no_pin)
    # Children inherit the raised soft limit: nginx and the gateway hold two sockets per stream.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    signal.signal(signal.SIGALRM, _raise_timeout)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.alarm(int(time_limit))
    tmp = Path(tempfile.mkdtemp(prefix="e2ee-bench-"))
    children = Children()
    stack = Stack(tmp, children, pinning, nginx_access_log=args.nginx_access_log == "on")
    refresher = HeartbeatRefresher(stack)
    failed = True
    try:
        logger.info("starting redis-server, fake provider, nginx and gateway in %s", tmp)
        stack.start()
        refresher.start()
        bench = Bench(stack, settings, tmp)
        bench.measure_redis_background()

        bench.s1_small_json()
        profile, profile_note = _profile(bench, settings, args.no_profile)
        bench.s2_streams()
        bench.s3_paced_streams()
        bench.s4_idle_streams()

        context = Context(
            title_note=(
                "**Quick run** (`--quick`: one short repetition): indicative only."
                if args.quick
                else f"Full run: {settings.repetitions} repetitions."
            ),
            command="python -m tests.bench.run"
            + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
            date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            machine=machine_facts(),
            setup=_setup_lines(pinning, stack.nginx_access_log, settings),
        )
        tables, document = render(
            bench.measurements,
            settings.s4_levels,
            context,
            profile,
            profile_note,
            stack.gateway_warnings(),
        )
        print(tables)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(document)
        logger.info("wrote %s", args.output)
        failed = False
    finally:
        signal.alarm(0)
        refresher.stop()
        children.stop_all()
        if failed or args.keep_tmp:
            logger.info("logs kept in %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _profile(
    bench: Bench, settings: BenchSettings, skip: bool
) -> tuple[py_spy.Profile | None, str]:
    """Sample the gateway during an extra, unmeasured S1 run; return the summary."""
    if skip:
        return None, "Not profiled (--no-profile)."
    tool = py_spy.py_spy_path()
    if tool is None:
        return None, "Not profiled: py-spy is not installed (`pip install py-spy`)."
    assert bench.stack.gateway is not None
    output = bench.tmp / "gateway-s1.collapsed"
    failures = []
    for native in (True, False):
        try:
            py_spy.record(
                tool,
                bench.stack.pinning.load,
                bench.stack.gateway.pid,
                settings.profile_s,
                output,
                lambda: bench.wrk_run(GATEWAY, JSON_PATH, JSON_BODY, settings.profile_s),
                native=native,
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            logger.warning("profiling (native=%s) failed: %s", native, exc)
            failures.append(str(exc))
            continue
        mode = "`--native` (C frames included)" if native else "`--nonblocking` (Python frames)"
        note = (
            f"py-spy {py_spy.PY_SPY_RATE_HZ} Hz {mode} samples of the gateway during an extra, "
            f"unmeasured {settings.profile_s:.0f} s S1 run (pinned requests)."
        )
        return py_spy.summarise(output), note
    return None, "Not profiled: " + " / ".join(failures)


if __name__ == "__main__":
    sys.exit(main())
