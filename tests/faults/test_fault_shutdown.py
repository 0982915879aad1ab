"""Shutdown finishes even when a registry call swallows the cancellation meant to stop it.

redis-py 8.2.0 asyncio sometimes completes a command normally although its task was
cancelled while the command released its connection (about 7% of cancels that land
mid-command, measured with ``Redis.ping()`` against a local redis-server). A background
loop that calls the registry then runs on, and a shutdown that cancels it once and
waits never returns. The registry double below swallows every cancellation the same
way once per task, so the race is hit on every run.
"""

from __future__ import annotations

import asyncio

import pytest
from gateway_harness import SettingsFactory

from proxy.server import start_gateway
from registry import MemoryRegistry

STOP_BOUND_S = 3.0
BACKGROUND_TASKS = {"registry-reaper", "provider-gauges"}


class SwallowingRegistry(MemoryRegistry):
    """A memory registry whose background-loop calls each swallow the first cancellation."""

    def __init__(self) -> None:
        super().__init__()
        self.swallowed: set[str] = set()

    async def _swallow(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            if task.get_name() in self.swallowed:
                raise
            # The library bug being imitated: the call returns normally.
            self.swallowed.add(task.get_name())

    async def reap(self) -> int:
        await self._swallow()
        return await super().reap()

    async def now(self) -> float:
        await self._swallow()
        return await super().now()


@pytest.mark.parametrize("task_name", sorted(BACKGROUND_TASKS))
async def test_stop_ends_loop_despite_swallowed_cancel(
    make_settings: SettingsFactory, task_name: str
) -> None:
    registry = SwallowingRegistry()
    running = await start_gateway(
        make_settings(reap_interval_s=0.01), registry=registry, provider_gauges_interval_s=0.01
    )
    await asyncio.sleep(0.1)
    loops = [task for task in asyncio.all_tasks() if task.get_name() in BACKGROUND_TASKS]

    try:
        async with asyncio.timeout(STOP_BOUND_S):
            await running.stop()
        stopped = [task.done() for task in loops if task.get_name() == task_name]
    finally:
        await end_tasks(loops)
        await registry.aclose()

    assert stopped == [True]


async def end_tasks(tasks: list[asyncio.Task[object]]) -> None:
    """Cancel ``tasks`` until they end, so a failing run does not hang the event loop."""
    for task in tasks:
        while not task.done():
            task.cancel("test over")
            await asyncio.wait([task], timeout=0.05)
