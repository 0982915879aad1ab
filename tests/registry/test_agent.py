"""The heartbeat agent against a fake gateway admin listener and a demo provider."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.demo.provider import DemoServer, serve_demo_provider
from proxy.demo.state import DemoConfig
from registry.agent import HeartbeatAgent
from registry.agent_logic import AgentConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "provider-token-do-not-log"
WAIT_S = 5.0


@dataclass
class Beat:
    authorization: str | None
    body: dict[str, Any]


@dataclass
class Delete:
    pubkey: str
    url: str | None
    authorization: str | None


@dataclass
class FakeGateway:
    """A gateway admin listener that records heartbeats and DELETEs.

    ``script`` maps a pubkey (or ``"*"`` for any) to statuses for its next heartbeats.
    Without a scripted status it returns 200 with ``interval_s`` as the heartbeat interval.
    """

    interval_s: float = 0.1
    script: dict[str, list[int]] = field(default_factory=dict)
    beats: list[Beat] = field(default_factory=list)
    deletes: list[Delete] = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def beats_for(self, pubkey: str) -> list[Beat]:
        return [beat for beat in self.beats if beat.body["pubkey"] == pubkey]

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout_s)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def heartbeat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.beats.append(Beat(request.headers.get("Authorization"), body))
        self.history.append(("beat", body["pubkey"]))
        queue = self.script.get(body["pubkey"]) or self.script.get("*")
        status = queue.pop(0) if queue else 200
        await self._notify()
        if status != 200:
            error = {"message": f"scripted {status}", "type": "x", "param": None, "code": None}
            return web.json_response({"error": error}, status=status)
        return web.json_response(
            {
                "pubkey": body["pubkey"],
                "model": body["model"],
                "url": body["url"],
                "expires_in_s": body["ttl_s"],
                "heartbeat_interval_s": self.interval_s,
            }
        )

    async def delete(self, request: web.Request) -> web.Response:
        pubkey = request.match_info["pubkey"]
        self.deletes.append(
            Delete(pubkey, request.query.get("url"), request.headers.get("Authorization"))
        )
        self.history.append(("delete", pubkey))
        await self._notify()
        return web.Response(status=204)


@asynccontextmanager
async def serve_gateway(gateway: FakeGateway, port: int = 0) -> AsyncIterator[str]:
    """Serve ``gateway`` on 127.0.0.1 and yield its base URL."""
    app = web.Application()
    app.router.add_post("/v1/providers/heartbeat", gateway.heartbeat)
    app.router.add_delete("/v1/providers/{pubkey}", gateway.delete)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        host, bound_port = runner.addresses[0][:2]
        yield f"http://{host}:{bound_port}"
    finally:
        await runner.cleanup()


async def eventually(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Wait until ``predicate()`` is true, checking every 10 ms; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
async def gateway_url(gateway: FakeGateway) -> AsyncIterator[str]:
    async with serve_gateway(gateway) as url:
        yield url


@pytest.fixture
async def demo() -> AsyncIterator[DemoServer]:
    async with serve_demo_provider(DemoConfig(model="demo-model")) as server:
        yield server


@pytest.fixture
def make_config(gateway_url: str, demo: DemoServer) -> Callable[..., AgentConfig]:
    def make(**overrides: Any) -> AgentConfig:
        values: dict[str, Any] = {
            "gateway_url": gateway_url,
            "token": TOKEN,
            "model": "demo-model",
            "provider_url": demo.url,
            "ttl_s": 0.6,
            "report_interval_s": 60.0,
            "request_timeout_s": 1.0,
            "backoff_base_s": 0.02,
        }
        values.update(overrides)
        return AgentConfig(**values)

    return make


@pytest.fixture
async def start_agent() -> AsyncIterator[Callable[[AgentConfig], HeartbeatAgent]]:
    """Start agents in tasks; stop each at teardown and wait for it to deregister."""
    running: list[tuple[HeartbeatAgent, asyncio.Task[None]]] = []

    def start(config: AgentConfig) -> HeartbeatAgent:
        agent = HeartbeatAgent(config)
        task = asyncio.create_task(agent.run(), name=f"heartbeat-agent-{config.instance_id}")
        running.append((agent, task))
        return agent

    yield start
    for agent, task in running:
        agent.stop()
        await asyncio.wait_for(task, WAIT_S)


def key_of(demo: DemoServer, algo: str) -> str:
    return demo.config.keys.public_key_hex(algo)


# Heartbeats


async def test_heartbeat_carries_token_and_body(
    gateway: FakeGateway,
    demo: DemoServer,
    make_config: Callable[..., AgentConfig],
    start_agent: Callable[[AgentConfig], HeartbeatAgent],
) -> None:
    config = make_config()
    start_agent(config)
    ed25519, ecdsa = key_of(demo, "ed25519"), key_of(demo, "ecdsa")
    await gateway.wait_for(lambda: bool(gateway.beats_for(ed25519) and gateway.beats_for(ecdsa)))
    beat = gateway.beats_for(ecdsa)[0]

    assert beat.authorization == f"Bearer {TOKEN}"
    assert beat.body == {
        "pubkey": ecdsa,
        "model": "demo-model",
        "url": demo.url,
        "signing_algo": "ecdsa",
        "ttl_s": 0.6,
        "instance_id": config.instance_id,
    }
    assert gateway.beats_for(ed25519)[0].body["signing_algo"] == "ed25519"


async def test_heartbeats_repeat_at_gateway_interval(
    gateway: FakeGateway,
    demo: DemoServer,
    make_config: Callable[..., AgentConfig],
    start_agent: Callable[[AgentConfig], HeartbeatAgent],
) -> None:
    gateway.interval_s = 0.05
    config = make_config(signing_algos=("ed25519",))
    start_agent(config)
    await gateway.wait_for(lambda: len(gateway.beats) >= 4)

    assert {beat.body["instance_id"] for beat in gateway.beats} == {config.instance_id}
    assert {beat.body["pubkey"] for beat in gateway.beats} == {key_of(demo, "ed25519")}


async def test_backoff_on_503_then_recovery(
    gateway: FakeGateway,
    make_config: Callable[..., AgentConfig],
    start_agent: Callable[[AgentConfig], HeartbeatAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A long gateway interval: only retries can explain several heartbeats in a second.
    gateway.interval_s = 30.0
    gateway.script["*"] = [503, 503, 503, 503]
    start_agent(make_config(signing_algos=("ed25519",)))
    await gateway.wait_for(lambda: len(gateway.beats) >= 5, timeout_s=2.0)
    await asyncio.sleep(0.3)

    assert len(gateway.beats) == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "503" in r.message]
    assert len(warnings) == 4


async def test_unreachable_gateway_retried_until_up(
    demo: DemoServer,
    caplog: pytest.LogCaptureFixture,
    start_agent: Callable[[AgentConfig], HeartbeatAgent],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gateway = FakeGateway()
    config = AgentConfig(
        gateway_url=f"http://127.0.0.1:{port}",
        token=TOKEN,
        model="demo-model",
        provider_url=demo.url,
        signing_algos=("ed25519",),
        ttl_s=0.6,
        backoff_base_s=0.02,
    )
    start_agent(config)
    await eventually(lambda: any("heartbeat for key" in r.message for r in caplog.records))

    async with serve_gateway(gateway, port):
        await gateway.wait_for(lambda: len(gateway.beats) >= 1)

    assert gateway.beats[0].body["pubkey"] == key_of(demo, "ed25519")


async def test_no_heartbeats_while_provider_unhealthy(
    gateway: FakeGateway,
    demo: DemoServer,
    make_config: Callable[..., AgentConfig],
    start_agent: Callable[[AgentConfig], HeartbeatAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway.interval_s = 0.05
    start_agent(make_config(signing_algos=("ed25519",)))
    await gateway.wait_for(lambda: len(gateway.beats) >= 1)
    reports_before = demo.state.requests["/v1/attestation/report"]

    # After two failed health checks the round in flight has ended.
    demo.config.healthy = False
    checks = demo.state.requests["/health"]
    await eventually(lambda: demo.state.requests["/health"] >= checks + 2)
    beats_while_down = len(gateway.beats)
    checks = demo.state.requests["/health"]
    await eventually(lambda: demo.state.requests["/health"] >= checks + 3)
    assert len(gateway.beats) == beats_while_down

    demo.config.healthy = True
    await gateway.wait_for(lambda: len(gateway.beats) > beats_while_down)
    assert demo.state.requests["/v1/attestation/report"] > reports_before
    paused = [r for r in caplog.records if "heartbeats paused" in r.message]
    assert len(paused) == 1


async def test_key_rotation_registers_new_then_deletes_old(
    gateway: FakeGateway,
    demo: DemoServer,
    make_config: Callable[..., AgentConfig],
    start_agent: Callable[[AgentConfig], HeartbeatAgent],
) -> None:
    gateway.interval_s = 0.05
    start_agent(make_config(signing_algos=("ed25519",), report_interval_s=0.1))
    old = key_of(demo, "ed25519")
    await gateway.wait_for(lambda: len(gateway.beats_for(old)) >= 1)

    new = demo.config.rotate_keys().public_key_hex("ed25519")
    await gateway.wait_for(lambda: ("delete", old) in gateway.history)
    deletes = [d for d in gateway.deletes if d.pubkey == old]

    assert gateway.history.index(("beat", new)) < gateway.history.index(("delete", old))
    assert deletes[0].url == demo.url
    assert deletes[0].authorization == f"Bearer {TOKEN}"


async def test_stop_deregisters_every_key(
    gateway: FakeGateway, demo: DemoServer, make_config: Callable[..., AgentConfig]
) -> None:
    agent = HeartbeatAgent(make_config())
    task = asyncio.create_task(agent.run(), name="heartbeat-agent-stop-test")
    await gateway.wait_for(lambda: len({b.body["pubkey"] for b in gateway.beats}) == 2)

    agent.stop()
    await asyncio.wait_for(task, WAIT_S)

    assert {d.pubkey for d in gateway.deletes} == {key_of(demo, "ed25519"), key_of(demo, "ecdsa")}
    assert {d.url for d in gateway.deletes} == {demo.url}
    assert agent.registered == frozenset()


async def test_retired_key_stops_heartbeating(
    gateway: FakeGateway, demo: DemoServer, make_config: Callable[..., AgentConfig]
) -> None:
    gateway.interval_s = 0.05
    ed25519, ecdsa = key_of(demo, "ed25519"), key_of(demo, "ecdsa")
    gateway.script[ed25519] = [410]
    agent = HeartbeatAgent(make_config())
    task = asyncio.create_task(agent.run(), name="heartbeat-agent-retired-test")
    await gateway.wait_for(lambda: len(gateway.beats_for(ecdsa)) >= 4)
    agent.stop()
    await asyncio.wait_for(task, WAIT_S)

    assert len(gateway.beats_for(ed25519)) == 1
    assert [d.pubkey for d in gateway.deletes] == [ecdsa]


async def test_conflict_logged_and_retried(
    gateway: FakeGateway,
    make_config: Callable[..., AgentConfig],
    start_agent: Callable[[AgentConfig], HeartbeatAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway.interval_s = 0.05
    gateway.script["*"] = [409]
    start_agent(make_config(signing_algos=("ed25519",)))
    await gateway.wait_for(lambda: len(gateway.beats) >= 2)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]

    assert len(errors) == 1
    assert "scripted 409" in errors[0].message


async def test_unauthorized_logged_without_token(
    gateway: FakeGateway,
    make_config: Callable[..., AgentConfig],
    start_agent: Callable[[AgentConfig], HeartbeatAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway.interval_s = 0.05
    gateway.script["*"] = [401, 401]
    start_agent(make_config(signing_algos=("ed25519",)))
    await gateway.wait_for(lambda: len(gateway.beats) >= 3)

    assert any(r.levelno == logging.ERROR and "401" in r.message for r in caplog.records)
    assert TOKEN not in caplog.text


async def test_keys_logged_as_prefix_only(
    gateway: FakeGateway,
    demo: DemoServer,
    make_config: Callable[..., AgentConfig],
    start_agent: Callable[[AgentConfig], HeartbeatAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    start_agent(make_config())
    await gateway.wait_for(lambda: len(gateway.beats) >= 2)
    await eventually(lambda: "registered key" in caplog.text)

    assert key_of(demo, "ed25519")[:16] in caplog.text
    assert key_of(demo, "ed25519") not in caplog.text
    assert key_of(demo, "ecdsa") not in caplog.text


async def test_unoffered_algo_skipped_with_warning(
    gateway: FakeGateway,
    gateway_url: str,
    caplog: pytest.LogCaptureFixture,
    start_agent: Callable[[AgentConfig], HeartbeatAgent],
) -> None:
    gateway.interval_s = 0.05
    async with serve_demo_provider(DemoConfig(signing_algos=("ed25519",))) as demo:
        config = AgentConfig(
            gateway_url=gateway_url,
            token=TOKEN,
            model="demo-model",
            provider_url=demo.url,
            ttl_s=0.6,
            report_interval_s=0.05,
        )
        agent = start_agent(config)
        await gateway.wait_for(lambda: len(gateway.beats) >= 3)
        agent.stop()

    assert {beat.body["signing_algo"] for beat in gateway.beats} == {"ed25519"}
    skipped = [r for r in caplog.records if "does not offer ecdsa" in r.message]
    assert len(skipped) == 1
    assert skipped[0].levelno == logging.WARNING


async def test_pubkey_mode_skips_report(
    gateway: FakeGateway,
    demo: DemoServer,
    make_config: Callable[..., AgentConfig],
    start_agent: Callable[[AgentConfig], HeartbeatAgent],
) -> None:
    gateway.interval_s = 0.05
    pubkey = "0a" * 32
    start_agent(make_config(pubkey=pubkey))
    await gateway.wait_for(lambda: len(gateway.beats) >= 2)

    assert {beat.body["pubkey"] for beat in gateway.beats} == {pubkey}
    assert gateway.beats[0].body["signing_algo"] == "ed25519"
    assert demo.state.requests["/v1/attestation/report"] == 0


async def test_injected_session_left_open(
    gateway: FakeGateway, make_config: Callable[..., AgentConfig]
) -> None:
    async with aiohttp.ClientSession() as session:
        agent = HeartbeatAgent(make_config(signing_algos=("ed25519",)), session=session)
        task = asyncio.create_task(agent.run(), name="heartbeat-agent-session-test")
        await gateway.wait_for(lambda: len(gateway.beats) >= 1)
        agent.stop()
        await asyncio.wait_for(task, WAIT_S)

        assert not session.closed
        assert len(gateway.deletes) == 1


# Command line


async def test_command_deregisters_on_sigterm(
    gateway: FakeGateway, gateway_url: str, demo: DemoServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "registry.agent",
        "--gateway",
        gateway_url,
        "--token-file",
        str(token_file),
        "--model",
        "demo-model",
        "--provider-url",
        demo.url,
        "--signing-algo",
        "ed25519",
        "--ttl-s",
        "1",
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await gateway.wait_for(lambda: len(gateway.beats) >= 1, timeout_s=15.0)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=10.0)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0
    assert [d.pubkey for d in gateway.deletes] == [key_of(demo, "ed25519")]
    assert gateway.deletes[0].url == demo.url
    assert TOKEN.encode() not in stderr
