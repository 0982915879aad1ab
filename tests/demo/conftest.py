"""Fixtures for the demo provider tests: a running provider and a client session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.demo.provider import DemoServer, serve_demo_provider
from proxy.demo.state import DemoConfig


@pytest.fixture
def demo_config() -> DemoConfig:
    return DemoConfig(model="demo-model")


@pytest.fixture
async def demo(demo_config: DemoConfig) -> AsyncIterator[DemoServer]:
    """A demo provider serving ``demo_config`` on a free port of 127.0.0.1."""
    async with serve_demo_provider(demo_config) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session
