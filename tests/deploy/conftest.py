"""Fixtures of the deployment tests: a demo provider, two replicas, HAProxy and nginx.

The replicas share the session's redis-server under a key prefix of their own and are
child processes (``python -m proxy``), so that tests can send them real signals.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from deploy_harness import (
    DEPLOY,
    MODEL,
    Cluster,
    ClusterStarter,
    LoadBalancerStarter,
    Process,
    Replica,
    free_port,
    gateway_env,
    render,
    require_binary,
    wait_http,
)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Collect the test's child processes and stop those still running at the end."""
    started: list[Process] = []
    yield started
    # Signal all first: each replica then waits out its drain delay in parallel.
    for process in started:
        process.terminate()
    for process in reversed(started):
        process.kill(terminated=True)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def write_secrets(directory: Path) -> dict[str, str]:
    """Write random provider and admin tokens as files readable by the owner only."""
    values = {
        "provider_token": secrets.token_urlsafe(24),
        "admin_token": secrets.token_urlsafe(24),
    }
    files = {
        "provider-tokens": f"demo {values['provider_token']}\n",
        "provider-token": values["provider_token"] + "\n",
        "admin-token": values["admin_token"] + "\n",
    }
    for name, text in files.items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        path.chmod(0o600)
    return values


@pytest.fixture
def start_cluster(
    tmp_path: Path,
    redis_server: Any,
    processes: list[Process],
    http: aiohttp.ClientSession,
) -> ClusterStarter:
    """Return a starter of a registered provider with two replicas behind nothing yet."""

    async def start(
        *, events: int, event_delay_s: float, log_formats: tuple[str, str] = ("text", "text")
    ) -> Cluster:
        # 1. The demo provider.
        values = write_secrets(tmp_path)
        provider_port = free_port()
        provider = Process(
            "demo provider",
            [
                sys.executable,
                "-m",
                "proxy.demo",
                "--port",
                str(provider_port),
                "--model",
                MODEL,
                "--events",
                str(events),
                "--event-delay-s",
                str(event_delay_s),
            ],
            dict(os.environ),
            tmp_path / "provider.log",
        )
        processes.append(provider)
        provider.start()
        provider_url = f"http://127.0.0.1:{provider_port}"

        # 2. Two replicas on one Redis key prefix of their own.
        prefix = f"deploy-{secrets.token_hex(6)}"
        replicas = []
        for index, log_format in enumerate(log_formats, start=1):
            port, admin_port = free_port(), free_port()
            env = gateway_env(
                port=port,
                admin_port=admin_port,
                redis_url=redis_server.url,
                prefix=prefix,
                secrets_dir=tmp_path,
                GATEWAY_LOG_FORMAT=log_format,
            )
            process = Process(
                f"gateway {index}",
                [sys.executable, "-m", "proxy"],
                env,
                tmp_path / f"gateway-{index}.log",
            )
            processes.append(process)
            replicas.append(Replica(process, port, admin_port))
        await wait_http(http, provider_url + "/health", provider)
        for replica in replicas:
            await replica.start(http)

        # 3. The heartbeat agent. The registry is shared, so heartbeats to one replica
        #    register with both.
        agent = Process(
            "heartbeat agent",
            [
                sys.executable,
                "-m",
                "registry.agent",
                "--gateway",
                replicas[0].admin_url,
                "--token-file",
                str(tmp_path / "provider-token"),
                "--model",
                MODEL,
                "--provider-url",
                provider_url,
            ],
            dict(os.environ),
            tmp_path / "agent.log",
        )
        processes.append(agent)
        agent.start()
        for replica in replicas:
            await wait_http(http, replica.url + "/v1/models", agent, accept=MODEL.encode())
        return Cluster(provider, provider_url, agent, replicas, values, tmp_path)

    return start


@pytest.fixture
def haproxy_binary() -> str:
    return require_binary("haproxy", "haproxy")


@pytest.fixture
def nginx_binary() -> str:
    return require_binary("nginx", "nginx")


@pytest.fixture
def start_haproxy(
    haproxy_binary: str, tmp_path: Path, processes: list[Process], http: aiohttp.ClientSession
) -> LoadBalancerStarter:
    """Return a starter of HAProxy with deploy/haproxy.cfg in front of a cluster."""

    async def start(cluster: Cluster) -> tuple[Process, str]:
        port = free_port()
        first, second = cluster.replicas
        config = render(
            DEPLOY / "haproxy.cfg",
            tmp_path / "haproxy.cfg",
            {
                "HAPROXY_BIND": f"127.0.0.1:{port}",
                "CHECK_INTER": "200ms",
                "GATEWAY_1_HOST": "127.0.0.1",
                "GATEWAY_1_PORT": str(first.port),
                "GATEWAY_2_HOST": "127.0.0.1",
                "GATEWAY_2_PORT": str(second.port),
            },
        )
        process = Process(
            "haproxy",
            [haproxy_binary, "-f", str(config), "-db"],
            dict(os.environ),
            tmp_path / "haproxy.log",
        )
        processes.append(process)
        process.start()

        url = f"http://127.0.0.1:{port}"
        await wait_http(http, url + "/healthz", process)
        return process, url

    return start


@pytest.fixture
def start_nginx(
    nginx_binary: str, tmp_path: Path, processes: list[Process], http: aiohttp.ClientSession
) -> LoadBalancerStarter:
    """Return a starter of nginx with deploy/nginx.conf in front of a cluster."""

    async def start(cluster: Cluster) -> tuple[Process, str]:
        port = free_port()
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        first, second = cluster.replicas
        config = render(
            DEPLOY / "nginx.conf",
            prefix / "nginx.conf",
            {
                "NGINX_LISTEN": f"127.0.0.1:{port}",
                "NGINX_RUN_DIR": str(prefix),
                "NGINX_LOG_DIR": str(prefix),
                "GATEWAY_1_HOST": "127.0.0.1",
                "GATEWAY_1_PORT": str(first.port),
                "GATEWAY_2_HOST": "127.0.0.1",
                "GATEWAY_2_PORT": str(second.port),
            },
        )

        # -e moves the error log that nginx opens before it reads its configuration, and
        # "daemon off;" keeps nginx in the foreground, so that its PID is the master's.
        process = Process(
            "nginx",
            [
                nginx_binary,
                "-c",
                str(config),
                "-p",
                str(prefix),
                "-e",
                str(prefix / "error.log"),
                "-g",
                "daemon off;",
            ],
            dict(os.environ),
            tmp_path / "nginx.log",
        )
        processes.append(process)
        process.start()

        url = f"http://127.0.0.1:{port}"
        await wait_http(http, url + "/healthz", process)
        return process, url

    return start
