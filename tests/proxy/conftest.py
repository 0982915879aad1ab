"""Fixtures of the gateway tests: token files, providers and gateways on 127.0.0.1.

Every server binds port 0 on 127.0.0.1 and is stopped when its test ends. Tests reach
the gateway only through its listeners. The memory registry's clock is the one thing
they move directly, to expire leases without sleeping.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_harness import (
    ADMIN_TOKEN,
    OTHER_PROVIDER_TOKEN,
    PROVIDER_TOKEN,
    Admin,
    DemoStarter,
    FakeClock,
    FakeStarter,
    GatewayProcess,
    GatewayStarter,
    Reply,
    ScriptedProvider,
    SettingsFactory,
    spawn_gateway,
)

from proxy.config import Settings
from proxy.demo.provider import DemoConfig, DemoServer, serve_demo_provider
from proxy.server import RunningGateway, start_gateway
from registry import MemoryRegistry


@pytest.fixture
def token_dir(tmp_path: Path) -> Path:
    """Write the provider tokens file (alice, bob) and the admin token file."""
    (tmp_path / "provider-tokens").write_text(
        f"# identity token\nalice {PROVIDER_TOKEN}\n\nbob {OTHER_PROVIDER_TOKEN}\n",
        encoding="utf-8",
    )
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n", encoding="utf-8")
    return tmp_path


@pytest.fixture
def make_settings(token_dir: Path) -> SettingsFactory:
    """Return a Settings builder with both token files and timeouts scaled down for tests."""
    defaults: dict[str, Any] = {
        "port": 0,
        "admin_port": 0,
        "provider_tokens_file": str(token_dir / "provider-tokens"),
        "admin_token_file": str(token_dir / "admin-token"),
        "allowed_provider_hosts": ("127.0.0.1/32",),
        "connect_timeout_s": 1.0,
        "first_byte_timeout_s": 5.0,
        "idle_timeout_s": 5.0,
        "request_timeout_s": 5.0,
        "retry_backoff_s": 0.01,
        "reap_interval_s": 0.2,
        # Most tests register made-up keys; the attestation tests turn this on.
        "require_attestation_match": False,
    }

    def make(**overrides: Any) -> Settings:
        return Settings(**{**defaults, **overrides})

    return make


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def start_gateway_with(
    make_settings: SettingsFactory, clock: FakeClock
) -> AsyncIterator[GatewayStarter]:
    """Return a starter of gateways; a memory:// one gets a MemoryRegistry on ``clock``."""
    async with AsyncExitStack() as stack:

        async def start(settings: Settings | None = None) -> RunningGateway:
            settings = settings or make_settings()
            registry = None
            if settings.registry_url.startswith("memory:"):
                registry = MemoryRegistry(clock)
                stack.push_async_callback(registry.aclose)
            running = await start_gateway(settings, registry=registry)
            stack.push_async_callback(running.stop)
            return running

        yield start


@pytest.fixture
async def gateway(start_gateway_with: GatewayStarter) -> RunningGateway:
    """A gateway on the memory registry with the default test settings."""
    return await start_gateway_with()


@pytest.fixture
async def redis_gateway(
    redis_server: Any, make_settings: SettingsFactory, start_gateway_with: GatewayStarter
) -> RunningGateway:
    """A gateway on the session's redis-server, with its own key prefix and short leases."""
    settings = make_settings(
        registry_url=redis_server.url,
        redis_prefix=f"test-{secrets.token_hex(6)}",
        heartbeat_ttl_min_s=0.5,
    )
    return await start_gateway_with(settings)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that leaves bodies as sent (no decompression)."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
def admin(gateway: RunningGateway, http: aiohttp.ClientSession) -> Admin:
    return Admin(http, gateway.admin_url)


@pytest.fixture
async def start_demo() -> AsyncIterator[DemoStarter]:
    """Return a starter of in-process demo providers (handler cancellation on)."""
    async with AsyncExitStack() as stack:

        async def start(config: DemoConfig | None = None) -> DemoServer:
            return await stack.enter_async_context(serve_demo_provider(config or DemoConfig()))

        yield start


@pytest.fixture
async def start_fake() -> AsyncIterator[FakeStarter]:
    """Return a starter of scripted providers."""
    async with AsyncExitStack() as stack:

        async def start(default: Reply | None = None) -> ScriptedProvider:
            provider = ScriptedProvider(default)
            await provider.start()
            stack.push_async_callback(provider.stop)
            return provider

        yield start


@pytest.fixture
def spawn(tmp_path: Path, token_dir: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Return a starter of gateway child processes with both token files; kills leftovers."""
    started: list[GatewayProcess] = []

    def start(log_name: str = "gateway.log", **env: str) -> GatewayProcess:
        base = {
            "GATEWAY_PROVIDER_TOKENS_FILE": str(token_dir / "provider-tokens"),
            "GATEWAY_ADMIN_TOKEN_FILE": str(token_dir / "admin-token"),
            "GATEWAY_ALLOWED_PROVIDER_HOSTS": "127.0.0.1/32",
            "GATEWAY_FIRST_BYTE_TIMEOUT_S": "5",
            "GATEWAY_IDLE_TIMEOUT_S": "5",
            # Scripted providers publish no attestation report.
            "GATEWAY_REQUIRE_ATTESTATION_MATCH": "off",
        }
        process = spawn_gateway({**base, **env}, tmp_path / log_name)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
