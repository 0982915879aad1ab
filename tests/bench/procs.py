"""Child processes of the benchmark and their CPU, memory and files from /proc.

Every child is started through ``Children``, which remembers its PID and stops it in
``stop_all()`` (SIGTERM, then SIGKILL after a timeout). Nothing is ever stopped by name.
CPU time is utime + stime from ``/proc/<pid>/stat``, memory is VmRSS from
``/proc/<pid>/status``; a process tree is the PID and its descendants, so that nginx's
master and worker count together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Return once 127.0.0.1:port accepts connections; raise RuntimeError otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout_s:.0f} s")


@dataclass(frozen=True, slots=True)
class Pinning:
    """CPU pinning prefixes: the system under test on CPU 0, the load generator on CPU 1."""

    server: tuple[str, ...]
    load: tuple[str, ...]
    note: str

    @classmethod
    def detect(cls, enabled: bool) -> Pinning:
        taskset = shutil.which("taskset")
        cpus = len(os.sched_getaffinity(0))
        if not enabled:
            return cls((), (), "not pinned (--no-pin)")
        if taskset is None:
            return cls((), (), "not pinned: taskset is missing (apt-get install -y util-linux)")
        if cpus < 2:
            return cls((), (), f"not pinned: only {cpus} CPU is available to this process")
        return cls(
            (taskset, "-c", "0"),
            (taskset, "-c", "1"),
            "taskset -c 0 for redis-server, the fake provider, nginx and the gateway; "
            "taskset -c 1 for wrk and the asyncio client",
        )


class Children:
    """The processes this benchmark started, stopped by PID in reverse order."""

    def __init__(self) -> None:
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a child with stdout and stderr appended to ``log_path``."""
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
            )
        self._processes.append((name, process))
        logger.debug("started %s as PID %d", name, process.pid)
        return process

    def stop(
        self, process: subprocess.Popen[bytes], *, repeat_after_s: float | None = None
    ) -> None:
        """Stop one child by PID: SIGTERM, then SIGKILL if it is still running.

        ``repeat_after_s`` sends a second SIGTERM after that delay, for programs such
        as the gateway that drain on the first signal and stop at once on the second.
        """
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            if repeat_after_s is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(repeat_after_s)
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "PID %d ignored SIGTERM for %.0f s: killing it", process.pid, STOP_TIMEOUT_S
                )
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        self._processes = [(n, p) for n, p in self._processes if p is not process]

    def stop_all(self) -> None:
        """Stop every child still known, the last started first, without draining."""
        for _, process in reversed(list(self._processes)):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.stop(process, repeat_after_s=0.5)


def process_tree(pid: int) -> list[int]:
    """Return ``pid`` and its descendants that are still running."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None:
            parents[int(entry.name)] = int(stat[1])
    tree = [pid]
    frontier = [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        tree.extend(children)
        frontier = children
    return tree


def _read_stat(pid: int) -> list[str] | None:
    """Return the fields of /proc/<pid>/stat after the command name, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; the fields follow the last ")".
    return raw[raw.rfind(")") + 2 :].split()


@dataclass(frozen=True, slots=True)
class Usage:
    """A sample of one process tree: CPU seconds, resident memory and open files."""

    cpu_s: float
    rss_kib: int
    open_fds: int


def sample(pid: int) -> Usage:
    """Sum the CPU time, VmRSS and open file descriptors over the tree of ``pid``."""
    cpu_ticks = 0
    rss_kib = 0
    fds = 0
    for member in process_tree(pid):
        stat = _read_stat(member)
        if stat is None:
            continue
        # Fields 14 and 15 of /proc/<pid>/stat (utime, stime) are at 11 and 12 here.
        cpu_ticks += int(stat[11]) + int(stat[12])
        rss_kib += _vm_rss_kib(member)
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{member}/fd"))
    return Usage(cpu_ticks / CLOCK_TICKS, rss_kib, fds)


def _vm_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
