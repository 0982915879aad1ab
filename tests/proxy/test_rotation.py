"""Key rotation end to end: agent, gateway and E2EE clients that refresh on 421."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
from gateway_harness import (
    ADMIN_TOKEN,
    MODEL,
    PROVIDER_TOKEN,
    DemoStarter,
    GatewayStarter,
    SettingsFactory,
)

from proxy.server import RunningGateway
from registry.agent import HeartbeatAgent
from registry.agent_logic import AgentConfig


async def _current_key(http: aiohttp.ClientSession, gateway: RunningGateway) -> str:
    async with http.get(
        gateway.url + "/v1/attestation/report",
        params={"model": MODEL, "signing_algo": "ed25519"},
    ) as response:
        assert response.status == 200
        report = await response.json()
    key: str = report["model_attestations"][0]["signing_public_key"]
    return key


class RefreshingClient:
    """An E2EE client: pins its cached key and refreshes it once on 421."""

    def __init__(self, gateway: RunningGateway, http: aiohttp.ClientSession, key: str) -> None:
        self.gateway = gateway
        self.http = http
        self.key = key
        self.openai = openai.AsyncOpenAI(
            base_url=gateway.url + "/v1", api_key="unused", max_retries=0
        )
        self.misdirected = 0
        self.completed = 0

    async def complete(self) -> None:
        for _ in range(2):
            try:
                stream = await self.openai.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "hello"}],
                    stream=True,
                    extra_headers={"X-Model-Pub-Key": self.key},
                )
                async for _chunk in stream:
                    pass
            except openai.APIStatusError as exc:
                if exc.status_code != 421:
                    raise
                self.misdirected += 1
                self.key = await _current_key(self.http, self.gateway)
                continue
            self.completed += 1
            return
        pytest.fail("the request failed again after refreshing the key")


async def test_rotation_costs_each_client_one_421(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_demo: DemoStarter,
) -> None:
    gateway = await start_gateway_with(
        make_settings(heartbeat_ttl_min_s=0.5, require_attestation_match=True)
    )
    demo = await start_demo()
    agent = HeartbeatAgent(
        AgentConfig(
            gateway_url=gateway.admin_url,
            token=PROVIDER_TOKEN,
            model=MODEL,
            provider_url=demo.url,
            signing_algos=("ed25519",),
            ttl_s=3.0,
            report_interval_s=0.1,
        )
    )
    agent_task = asyncio.create_task(agent.run(), name="agent")
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(10):
            while True:
                async with http.get(gateway.url + "/v1/models") as response:
                    if MODEL in await response.text():
                        break
                await asyncio.sleep(0.02)
        old_key = await _current_key(http, gateway)
        clients = [RefreshingClient(gateway, http, old_key) for _ in range(4)]

        for client in clients:
            await client.complete()
        demo.config.rotate_keys()
        new_key = demo.config.keys.public_key_hex("ed25519")
        async with asyncio.timeout(10):
            # The gateway's report is the provider's, so it shows the new key at once;
            # wait until the agent has registered it.
            while True:
                listing = await http.get(
                    gateway.admin_url + "/v1/providers",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                )
                if new_key in await listing.text():
                    break
                await asyncio.sleep(0.02)
            # The agent deregisters the old key right after registering the new one.
            while True:
                probe = await http.post(
                    gateway.url + "/v1/chat/completions",
                    json={"model": MODEL, "messages": []},
                    headers={"X-Model-Pub-Key": old_key},
                )
                await probe.read()
                if probe.status == 421:
                    break
                await asyncio.sleep(0.02)
        for _ in range(3):
            await asyncio.gather(*(client.complete() for client in clients))

        agent.stop()
        await asyncio.wait_for(agent_task, 10)
        for client in clients:
            await client.openai.close()

    assert old_key != new_key
    assert [client.misdirected for client in clients] == [1, 1, 1, 1]
    assert [client.completed for client in clients] == [4, 4, 4, 4]
    assert all(client.key == new_key for client in clients)
