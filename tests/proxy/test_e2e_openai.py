"""End-to-end: the official openai SDK through the gateway to demo and scripted providers."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from gateway_harness import (
    MODEL,
    WAIT_S,
    Admin,
    DemoStarter,
    FakeClock,
    FakeStarter,
    GatewayStarter,
    Reply,
    SettingsFactory,
    post_chat,
)

from proxy.demo.provider import DemoConfig, serve_demo_provider
from proxy.server import RunningGateway

# Copied from the product contract; clients match these bytes exactly.
STALE_KEY_BODY = (
    b'{"error":{"message":"The encryption key is no longer valid. Please refresh your '
    b'attestation report and retry.","type":"provider_error","param":null,"code":null}}'
)
UNAVAILABLE_BODY = (
    b'{"error":{"message":"The model is currently unavailable. Please try again later.",'
    b'"type":"bad_gateway","param":null,"code":null}}'
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "one two"
# The demo provider repeats the prompt's words, one per event.
EXPECTED_TEXT = "one two one two"


def sdk(gateway: RunningGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


async def stream_text(client: openai.AsyncOpenAI, pubkey: str | None = None) -> str:
    """Stream a chat completion and return its content."""
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        extra_headers={"X-Model-Pub-Key": pubkey} if pubkey is not None else None,
    )
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


async def status_error(client: openai.AsyncOpenAI, pubkey: str | None) -> openai.APIStatusError:
    """Stream a chat completion that must fail and return the SDK's error."""
    with pytest.raises(openai.APIStatusError) as caught:
        await stream_text(client, pubkey)
    return caught.value


def demo_config() -> DemoConfig:
    return DemoConfig(model=MODEL, events=4)


async def test_stream_unpinned_reaches_provider(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter
) -> None:
    demo = await start_demo(demo_config())
    await admin.register(demo.config.keys.public_key_hex("ed25519"), demo.url)

    async with sdk(gateway) as client:
        text = await stream_text(client)

    assert text == EXPECTED_TEXT
    assert demo.state.requests["/v1/chat/completions"] == 1


async def test_stream_pinned_reaches_key_holder_only(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter
) -> None:
    holder = await start_demo(demo_config())
    other = await start_demo(demo_config())
    key = holder.config.keys.public_key_hex("ed25519")
    await admin.register(key, holder.url)
    await admin.register(other.config.keys.public_key_hex("ed25519"), other.url)

    async with sdk(gateway) as client:
        texts = [await stream_text(client, key) for _ in range(4)]

    assert texts == [EXPECTED_TEXT] * 4
    assert holder.state.requests["/v1/chat/completions"] == 4
    assert other.state.requests["/v1/chat/completions"] == 0
    assert "X-Model-Pub-Key" not in holder.state.last_headers


async def test_stream_pinned_ecdsa_key_in_sec1_form(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter
) -> None:
    demo = await start_demo(demo_config())
    key = demo.config.keys.public_key_hex("ecdsa")
    await admin.register(key, demo.url, signing_algo="ecdsa")

    async with sdk(gateway) as client:
        text = await stream_text(client, "04" + key.upper())

    assert text == EXPECTED_TEXT


async def test_stale_key_gets_exact_421(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter
) -> None:
    demo = await start_demo(demo_config())
    await admin.register(demo.config.keys.public_key_hex("ed25519"), demo.url)
    stale = secrets.token_hex(32)

    async with sdk(gateway) as client:
        first = await status_error(client, stale)
        repeated = await status_error(client, stale)

    assert first.status_code == 421
    assert first.response.content == STALE_KEY_BODY
    assert first.response.headers["Content-Type"] == "application/json"
    assert repeated.status_code == 421
    assert repeated.response.content == STALE_KEY_BODY
    assert demo.state.requests["/v1/chat/completions"] == 0


async def test_key_of_another_model_gets_421(
    gateway: RunningGateway, admin: Admin, start_demo: DemoStarter
) -> None:
    demo = await start_demo(DemoConfig(model="other-model"))
    key = demo.config.keys.public_key_hex("ed25519")
    await admin.register(key, demo.url, model="other-model")

    async with sdk(gateway) as client:
        error = await status_error(client, key)

    assert error.status_code == 421
    assert error.response.content == STALE_KEY_BODY
    assert demo.state.requests["/v1/chat/completions"] == 0


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
async def test_stopped_provider_gets_exact_502(
    gateway: RunningGateway, admin: Admin, pinned: bool
) -> None:
    async with serve_demo_provider(demo_config()) as demo:
        key = demo.config.keys.public_key_hex("ed25519")
        await admin.register(key, demo.url)
        async with sdk(gateway) as client:
            assert await stream_text(client, key) == EXPECTED_TEXT

    async with sdk(gateway) as client:
        error = await status_error(client, key if pinned else None)

    assert error.status_code == 502
    assert error.response.content == UNAVAILABLE_BODY


async def _read_demo_banner(process: asyncio.subprocess.Process) -> tuple[str, str]:
    """Return (base URL, ed25519 key) from the lines a demo provider prints at start."""
    assert process.stdout is not None
    url = key = None
    async with asyncio.timeout(WAIT_S):
        while url is None or key is None:
            line = (await process.stdout.readline()).decode()
            assert line, "the demo provider exited before printing its URL and key"
            if found := re.search(r" at (http://\S+)", line):
                url = found.group(1)
            if found := re.search(r"ed25519 public key: ([0-9a-f]{64})", line):
                key = found.group(1)
    return url, key


async def test_killed_subprocess_provider_gets_exact_502(
    gateway: RunningGateway, admin: Admin
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.demo", "--port", "0", "--model", MODEL,
        "--events", "4",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        url, key = await _read_demo_banner(process)
        await admin.register(key, url)
        async with sdk(gateway) as client:
            assert await stream_text(client, key) == EXPECTED_TEXT

        process.kill()
        await process.communicate()
        async with sdk(gateway) as client:
            error = await status_error(client, key)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()

    assert error.status_code == 502
    assert error.response.content == UNAVAILABLE_BODY


async def test_stream_bytes_identical_direct_and_through_gateway(
    gateway: RunningGateway,
    admin: Admin,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    chunks = (
        b'data: {"id":"c1","choices":[{"delta":{"content":"caf\xc3\xa9"}}]}\n\n',
        b'data: {"id":"c1","choices":[{"delta":{"content":"\xe4\xb8',
        b'\xad\xf0\x9f\x99\x82"}}]}\n',
        b'\n: a comment line\n\n',
        b'data: {"id":"c1","choices":[]}\r\n\r\n',
        b"data: [DO",
        b"NE]\n\n",
    )
    fake = await start_fake(Reply(chunks=chunks))
    key = secrets.token_hex(32)
    await admin.register(key, fake.url)
    body = orjson.dumps({"model": MODEL, "stream": True, "messages": []})

    async with http.post(fake.url + "/v1/chat/completions", data=body) as direct:
        direct_bytes = await direct.read()
    gateway_bytes = (await post_chat(http, gateway, pubkey=key)).body

    assert direct_bytes == b"".join(chunks)
    assert gateway_bytes == direct_bytes
    assert fake.served[1].sent == direct_bytes


@dataclass
class Backend:
    """A gateway on one registry backend and a way to let its leases run out."""

    gateway: RunningGateway
    ttl_s: float
    pass_lease: Callable[[], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
async def backend(
    request: pytest.FixtureRequest,
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    clock: FakeClock,
) -> Backend:
    if request.param == "memory":
        ttl_s = 5.0

        async def advance_clock() -> None:
            clock.advance(ttl_s + 0.001)

        return Backend(await start_gateway_with(), ttl_s, advance_clock)

    redis_server = request.getfixturevalue("redis_server")
    settings = make_settings(
        registry_url=redis_server.url,
        redis_prefix=f"test-{secrets.token_hex(6)}",
        heartbeat_ttl_min_s=0.5,
    )

    async def nothing_to_do() -> None:
        """Redis TIME moves by itself; the test polls until the lease has ended."""

    return Backend(await start_gateway_with(settings), 1.0, nothing_to_do)


async def _wait_for_status(
    http: aiohttp.ClientSession, gateway: RunningGateway, pubkey: str, status: int
) -> float:
    """Poll pinned requests until one gets ``status``; return the seconds waited."""
    started = time.monotonic()
    deadline = started + WAIT_S
    while True:
        response = await post_chat(http, gateway, pubkey=pubkey)
        if response.status == status:
            return time.monotonic() - started
        assert time.monotonic() < deadline, f"still {response.status} after {WAIT_S} s"
        await asyncio.sleep(0.05)


async def _live_models(http: aiohttp.ClientSession, gateway: RunningGateway) -> list[str]:
    async with http.get(gateway.url + "/v1/models") as response:
        listing = orjson.loads(await response.read())
    return [model["id"] for model in listing["data"]]


async def test_lease_routes_then_expires(
    backend: Backend, http: aiohttp.ClientSession, start_demo: DemoStarter
) -> None:
    gateway = backend.gateway
    admin = Admin(http, gateway.admin_url)
    demo = await start_demo(demo_config())
    key = demo.config.keys.public_key_hex("ed25519")

    # Registered: routable pinned and unpinned, and listed.
    lease = await admin.register(key, demo.url, ttl_s=backend.ttl_s)
    assert lease["expires_in_s"] == backend.ttl_s
    async with sdk(gateway) as client:
        assert await stream_text(client, key) == EXPECTED_TEXT
        assert await stream_text(client) == EXPECTED_TEXT
    assert await _live_models(http, gateway) == [MODEL]

    # Lease over: the key is stale, the model recently seen but without a provider.
    await backend.pass_lease()
    await _wait_for_status(http, gateway, key, 421)
    async with sdk(gateway) as client:
        stale = await status_error(client, key)
        unpinned = await status_error(client, None)
    assert stale.status_code == 421
    assert stale.response.content == STALE_KEY_BODY
    assert unpinned.status_code == 503
    assert unpinned.code == "no_live_provider"
    assert await _live_models(http, gateway) == []
    served_before_renewal = demo.state.requests["/v1/chat/completions"]

    # A new heartbeat makes the key routable again.
    await admin.register(key, demo.url, ttl_s=backend.ttl_s)
    async with sdk(gateway) as client:
        assert await stream_text(client, key) == EXPECTED_TEXT
    assert demo.state.requests["/v1/chat/completions"] == served_before_renewal + 1


async def test_redis_lease_ends_after_ttl(
    redis_gateway: RunningGateway, http: aiohttp.ClientSession, start_demo: DemoStarter
) -> None:
    admin = Admin(http, redis_gateway.admin_url)
    demo = await start_demo(demo_config())
    key = demo.config.keys.public_key_hex("ed25519")

    await admin.register(key, demo.url, ttl_s=1.0)
    waited_s = await _wait_for_status(http, redis_gateway, key, 421)

    # The lease lasts its ttl_s on the Redis clock, not less.
    assert waited_s > 0.5
    assert demo.state.requests["/v1/chat/completions"] >= 1
