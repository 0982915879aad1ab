"""Pre-fork supervisor: ``GATEWAY_WORKERS`` above 1 runs that many gateway processes.

``e2ee-gateway --workers N`` becomes a supervisor that serves nothing itself. It starts N
worker processes (``python -m proxy``), each a complete single-process gateway with its
own event loop, registry client and snapshot, and upstream session. Every worker binds
both listeners with SO_REUSEPORT, so the kernel (Linux 3.9 and later) spreads new
connections over the workers by a hash of each connection's addresses and ports.

The supervisor talks to a worker through its environment and two inherited pipes:

- ``E2EE_GATEWAY_WORKER_INDEX``: the worker's slot, 0 to N-1. Its presence makes
  ``python -m proxy`` run as a worker rather than as another supervisor.
- ``E2EE_GATEWAY_READY_FD``: the write end of a pipe. The worker writes one byte once
  both listeners are bound and its signal handlers are installed. A worker that exits
  without writing it failed to start.
- ``E2EE_GATEWAY_LIFELINE_FD``: the read end of a pipe whose write end only the
  supervisor holds. End of file means the supervisor is gone (even after SIGKILL), and
  the worker then shuts down as on SIGTERM.
- ``PROMETHEUS_MULTIPROC_DIR``: the directory of every worker's metric values, which
  /metrics merges (see ``proxy.metrics``). prometheus_client reads it when first
  imported, and a fresh interpreter per worker guarantees that it is set by then.

Lifecycle:

1. Start: the supervisor starts the N workers. If one exits before it reports ready
   (a port held by a socket without SO_REUSEPORT, an unreadable token file), the
   supervisor kills the others and exits with that worker's exit code. The worker has
   already logged why on the shared stderr.
2. Run: a worker that exits later is logged at ERROR and started again after a backoff
   (``RestartPolicy``). When one slot uses up its restart budget, the supervisor stops
   every worker as on SIGTERM and exits 1.
3. Stop: SIGTERM or SIGINT is forwarded to every worker, which drains as a single
   gateway does. A second signal is forwarded too, and the workers stop at once. The
   supervisor exits 0 once every worker has exited 0.

Workers run in their own process group, so a Ctrl-C in a terminal reaches only the
supervisor, which forwards it once. A service manager must signal only the supervisor
too (systemd ``KillMode=mixed``), or each worker gets the signal twice and stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.multiprocess import mark_process_dead

from proxy.config import Settings

__all__ = ["RestartPolicy", "WorkerContext", "supervise"]

logger = logging.getLogger(__name__)

INDEX_VARIABLE = "E2EE_GATEWAY_WORKER_INDEX"
READY_FD_VARIABLE = "E2EE_GATEWAY_READY_FD"
LIFELINE_FD_VARIABLE = "E2EE_GATEWAY_LIFELINE_FD"
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

_READY = b"R"


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """The slot, pipes and metrics directory that the supervisor gives a worker process."""

    index: int
    ready_fd: int
    lifeline_fd: int
    metrics_dir: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerContext | None:
        """Return the context of a worker started by ``supervise``, or None for any other run."""
        if INDEX_VARIABLE not in env:
            return None
        return cls(
            index=int(env[INDEX_VARIABLE]),
            ready_fd=int(env[READY_FD_VARIABLE]),
            lifeline_fd=int(env[LIFELINE_FD_VARIABLE]),
            metrics_dir=env[METRICS_DIR_VARIABLE],
        )

    def report_ready(self) -> None:
        """Tell the supervisor that both listeners are bound. Call it once."""
        os.write(self.ready_fd, _READY)
        os.close(self.ready_fd)

    def watch_supervisor(self, on_gone: Callable[[], None]) -> None:
        """Call ``on_gone`` once, from the running event loop, when the supervisor exits."""
        loop = asyncio.get_running_loop()

        def readable() -> None:
            # The supervisor never writes: anything readable is the end of the file.
            loop.remove_reader(self.lifeline_fd)
            on_gone()

        loop.add_reader(self.lifeline_fd, readable)

    def unwatch_supervisor(self) -> None:
        """Stop the watch that ``watch_supervisor`` started, if it has not fired yet."""
        asyncio.get_running_loop().remove_reader(self.lifeline_fd)


@dataclass
class RestartPolicy:
    """Backoff and budget of one worker slot's restarts, in monotonic seconds.

    The n-th restart within ``window_s`` waits ``first_delay_s * 2**(n-1)``. A slot that
    would restart more than ``budget`` times within ``window_s`` is crash-looping: the
    supervisor gives up rather than hiding the fault.
    """

    first_delay_s: float = 0.5
    budget: int = 5
    window_s: float = 60.0
    _restarts: deque[float] = field(default_factory=deque)

    def next_delay(self, now: float) -> float | None:
        """Record an exit at ``now`` and return the delay before the restart (None: over budget)."""
        while self._restarts and now - self._restarts[0] > self.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.budget:
            return None
        delay = self.first_delay_s * 2.0 ** len(self._restarts)
        self._restarts.append(now)
        return delay


@dataclass(slots=True)
class Worker:
    """One running worker process of the supervisor."""

    slot: int
    process: asyncio.subprocess.Process
    initial: bool
    """Started with the supervisor, not as a restart: a startup failure stops everything."""
    ready: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(frozen=True, slots=True)
class _Ready:
    worker: Worker


@dataclass(frozen=True, slots=True)
class _Exited:
    worker: Worker
    returncode: int


@dataclass(frozen=True, slots=True)
class _Signal:
    signum: int


@dataclass(frozen=True, slots=True)
class _RestartDue:
    slot: int


_Event = _Ready | _Exited | _Signal | _RestartDue


def describe_exit(returncode: int) -> str:
    """Return 'exit code N' or 'killed by SIGNAME' for a subprocess return code."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def exit_status(returncode: int) -> int:
    """Return the supervisor's exit code for a worker's: shells use 128 + N for signal N."""
    return returncode if returncode >= 0 else 128 - returncode


class Supervisor:
    """Owner of the worker processes, following the lifecycle in the module docstring."""

    def __init__(self, settings: Settings, env: Mapping[str, str], metrics_dir: str) -> None:
        self._count = settings.workers
        self._env = dict(env)
        self._metrics_dir = metrics_dir
        self._events = asyncio.Queue[_Event]()
        self._workers: dict[int, Worker] = {}
        self._policies = {slot: RestartPolicy() for slot in range(self._count)}
        self._restarts: dict[int, asyncio.TimerHandle] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._all_ready = False
        self._exit_code = 0
        self._lifeline_read, self._lifeline_write = os.pipe()

    async def run(self) -> int:
        """Run the workers until all have stopped, and return the supervisor's exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._events.put_nowait, _Signal(signum))
        try:
            for slot in range(self._count):
                await self._spawn(slot, initial=True)
            while self._workers or self._restarts:
                event = await self._events.get()
                match event:
                    case _Signal(received):
                        self._on_signal(received)
                    case _Ready(worker):
                        self._on_ready(worker)
                    case _Exited(worker, returncode):
                        self._on_exit(worker, returncode)
                    case _RestartDue(slot):
                        # Absent when a stop began after the timer had fired.
                        if self._restarts.pop(slot, None) is not None:
                            await self._spawn(slot, initial=False)
        finally:
            # Reached with live workers only when the supervisor itself failed.
            await self._kill_all()
            for task in self._watchers:
                task.cancel("supervisor exiting")
            os.close(self._lifeline_read)
            os.close(self._lifeline_write)
        logger.info("all workers stopped; exiting with code %d", self._exit_code)
        return self._exit_code

    async def _spawn(self, slot: int, *, initial: bool) -> None:
        ready_read, ready_write = os.pipe()
        env = {
            **self._env,
            INDEX_VARIABLE: str(slot),
            READY_FD_VARIABLE: str(ready_write),
            LIFELINE_FD_VARIABLE: str(self._lifeline_read),
        }
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=(ready_write, self._lifeline_read),
                # Its own process group: a terminal's Ctrl-C reaches only the supervisor.
                process_group=0,
            )
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)
        worker = Worker(slot, process, initial)
        self._workers[slot] = worker
        logger.info("started worker %d (pid %d)", slot, worker.pid)
        watcher = asyncio.create_task(self._watch(worker, ready_read), name=f"watch-{worker.pid}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, worker: Worker, ready_fd: int) -> None:
        """Report the worker's readiness (if it gets that far), then its exit."""
        if await _read_ready(ready_fd):
            self._events.put_nowait(_Ready(worker))
        returncode = await worker.process.wait()
        self._events.put_nowait(_Exited(worker, returncode))

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping:
            logger.warning(
                "received %s again: forwarding it so that the workers stop at once", name
            )
        else:
            logger.info("received %s: forwarding it to %d worker(s)", name, len(self._workers))
            self._stop_restarts()
        self._signal_all(signum)

    def _on_ready(self, worker: Worker) -> None:
        worker.ready = True
        logger.info("worker %d (pid %d) is ready", worker.slot, worker.pid)
        initial = [w for w in self._workers.values() if w.initial]
        if not self._all_ready and len(initial) == self._count and all(w.ready for w in initial):
            self._all_ready = True
            logger.info("all %d workers are ready", self._count)

    def _on_exit(self, worker: Worker, returncode: int) -> None:
        del self._workers[worker.slot]
        # Removes the dead worker's live gauges from the merged metrics; its counters stay.
        mark_process_dead(worker.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        exit_description = describe_exit(returncode)

        if self._stopping:
            logger.info("worker %d (pid %d) stopped: %s", worker.slot, worker.pid, exit_description)
            # A worker that had not installed its handlers yet dies of the forwarded signal.
            clean = returncode in (0, -signal.SIGTERM, -signal.SIGINT)
            if not clean and self._exit_code == 0:
                self._exit_code = exit_status(returncode)
            return

        if worker.initial and not worker.ready:
            logger.error(
                "worker %d (pid %d) failed to start (%s); stopping the other workers",
                worker.slot,
                worker.pid,
                exit_description,
            )
            self._exit_code = exit_status(returncode) or 1
            self._stop_restarts()
            self._signal_all(signal.SIGKILL)
            return

        delay = self._policies[worker.slot].next_delay(time.monotonic())
        if delay is None:
            policy = self._policies[worker.slot]
            logger.error(
                "worker %d (pid %d) exited unexpectedly (%s) after %d restarts within "
                "%.0f s: stopping all workers",
                worker.slot,
                worker.pid,
                exit_description,
                policy.budget,
                policy.window_s,
            )
            self._exit_code = 1
            self._stop_restarts()
            self._signal_all(signal.SIGTERM)
            return
        logger.error(
            "worker %d (pid %d) exited unexpectedly (%s); restarting it in %.1f s",
            worker.slot,
            worker.pid,
            exit_description,
            delay,
        )
        self._restarts[worker.slot] = asyncio.get_running_loop().call_later(
            delay, self._events.put_nowait, _RestartDue(worker.slot)
        )

    def _stop_restarts(self) -> None:
        """Enter the stopping state: no worker is started from now on."""
        self._stopping = True
        for timer in self._restarts.values():
            timer.cancel()
        self._restarts.clear()

    def _signal_all(self, signum: int) -> None:
        for worker in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    async def _kill_all(self) -> None:
        self._stop_restarts()
        for worker in list(self._workers.values()):
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            await worker.process.wait()
            mark_process_dead(worker.pid, self._metrics_dir)  # type: ignore[no-untyped-call]


async def _read_ready(fd: int) -> bool:
    """Return True when the readiness byte arrives on ``fd``, False at end of file."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        return await reader.read(1) == _READY
    finally:
        transport.close()


@contextlib.contextmanager
def metrics_directory(configured: str | None) -> Iterator[str]:
    """Yield the directory of the workers' metric files.

    An operator's ``PROMETHEUS_MULTIPROC_DIR`` is emptied of prometheus_client's ``*.db``
    files at start (values of an earlier run would be added to this one's) and kept.
    Without it, a private temporary directory is created and removed at exit.
    """
    if configured:
        os.makedirs(configured, exist_ok=True)
        for path in glob.glob(os.path.join(configured, "*.db")):
            os.remove(path)
        yield configured
        return
    created = tempfile.mkdtemp(prefix="e2ee-gateway-metrics-")
    try:
        yield created
    finally:
        shutil.rmtree(created, ignore_errors=True)


def supervise(settings: Settings, overrides: Mapping[str, str]) -> int:
    """Run ``settings.workers`` workers until they stop, and return the exit code.

    ``overrides`` are the GATEWAY_* values given as flags; the workers get them in their
    environment, so that they read the same settings as the supervisor.
    """
    # The CPUs this process may run on; a container or taskset may allow fewer than exist.
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    if settings.workers > cpus:
        logger.warning(
            "%d workers on %d CPU core(s): workers beyond one per core compete for the same cores",
            settings.workers,
            cpus,
        )
    with metrics_directory(os.environ.get(METRICS_DIR_VARIABLE)) as metrics_dir:
        logger.info(
            "starting %d workers; their metrics are merged in %s",
            settings.workers,
            metrics_dir,
        )
        env = {**os.environ, **overrides, METRICS_DIR_VARIABLE: metrics_dir}
        return asyncio.run(Supervisor(settings, env, metrics_dir).run())
