"""Command line of the gateway: ``e2ee-gateway`` or ``python -m proxy``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from proxy.auth import TokenFileError
from proxy.config import ConfigError, Settings, flag_help
from proxy.logs import configure_logging
from proxy.metrics import Metrics
from proxy.server import start_gateway
from proxy.workers import WorkerContext, supervise

logger = logging.getLogger("proxy")

GC_YOUNG_THRESHOLD = 20_000
"""Allocations between young-generation collections (CPython's default is 700)."""


def parse_args(argv: Sequence[str] | None) -> dict[str, str]:
    """Return GATEWAY_* values given as flags; flags win over the environment."""
    parser = argparse.ArgumentParser(
        prog="e2ee-gateway",
        description=(
            "Gateway for end-to-end-encrypted LLM inference. Every flag mirrors a GATEWAY_* "
            "environment variable; durations are in seconds."
        ),
    )
    for flag, variable, help_text in flag_help():
        parser.add_argument(flag, dest=variable, metavar="VALUE", help=f"{help_text} ({variable})")
    namespace = parser.parse_args(argv)
    return {name: value for name, value in vars(namespace).items() if value is not None}


async def serve(settings: Settings, worker: WorkerContext | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain; a second signal stops at once.

    A ``worker`` of the supervisor shares both ports (SO_REUSEPORT), keeps its metrics in
    the shared multiprocess directory, reports ready once it listens, and drains as on
    SIGTERM when the supervisor is gone.
    """
    metrics = None if worker is None else Metrics(multiprocess_dir=worker.metrics_dir)
    running = await start_gateway(settings, metrics=metrics, reuse_port=worker is not None)
    # Objects that live for the whole process (modules, app, settings) move to the
    # permanent generation, and the young generation is collected less often: a request
    # allocates many short-lived objects, and collections showed up in profiles.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    # Each item is the reason to stop: a signal, or the supervisor's exit.
    stops = asyncio.Queue[str]()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stops.put_nowait, f"received {signum.name}")
    if worker is not None:
        worker.watch_supervisor(lambda: stops.put_nowait("the supervisor exited"))
        worker.report_ready()
    try:
        first = await stops.get()
        logger.info("%s: shutting down gracefully", first)
        if worker is not None:
            # Once draining, only a second signal cuts the drain short.
            worker.unwatch_supervisor()
        drain = asyncio.create_task(running.drain_and_stop(), name="drain")
        second = asyncio.create_task(stops.get(), name="second-signal")
        await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            logger.warning("received a second signal: stopping at once")
            drain.cancel("second signal")
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
    finally:
        await running.stop()
        logger.info("stopped")


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one, as nginx's worker_rlimit_nofile does.

    Each proxied stream holds two descriptors; the usual soft limit of 1024 would stop
    the gateway at about 500 concurrent streams.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return
    logger.info("raised the open-file limit from %d to %d", soft, target)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        overrides = parse_args(argv)
        settings = Settings.from_env({**os.environ, **overrides})
    except ConfigError as exc:
        print(f"e2ee-gateway: {exc}", file=sys.stderr)
        return 2
    worker = WorkerContext.from_env(os.environ)
    configure_logging(
        settings.log_format, settings.log_level, worker=None if worker is None else worker.index
    )
    if settings.workers > 1 and worker is None:
        try:
            return supervise(settings, overrides)
        except OSError as exc:
            logger.error("cannot run the workers: %s", exc)
            return 1
    raise_open_file_limit()
    try:
        run(serve(settings, worker))
    except TokenFileError as exc:
        logger.error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return 0


def run(main_coroutine: Coroutine[Any, Any, None]) -> None:
    """Run the coroutine on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coroutine)
    else:
        uvloop.run(main_coroutine)


if __name__ == "__main__":
    sys.exit(main())
