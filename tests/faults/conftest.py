"""Fixtures of the fault tests: the gateway fixtures of ``tests/proxy``, loaded by
``proxy_fixtures``, and a client that closes each connection."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from proxy_fixtures import load_proxy_fixtures

_proxy_fixtures = load_proxy_fixtures()

token_dir = _proxy_fixtures.token_dir
make_settings = _proxy_fixtures.make_settings
clock = _proxy_fixtures.clock
start_gateway_with = _proxy_fixtures.start_gateway_with
gateway = _proxy_fixtures.gateway
http = _proxy_fixtures.http
admin = _proxy_fixtures.admin
start_demo = _proxy_fixtures.start_demo
start_fake = _proxy_fixtures.start_fake


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that closes each connection after its response.

    A kept-alive client connection would keep a gateway task and two descriptors
    open, which the resource checks would count as a leak.
    """
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session
