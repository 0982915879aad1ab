"""Signature fetches reach the provider that served the completion, through any replica."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from gateway_harness import (
    MODEL,
    Admin,
    DemoStarter,
    FakeStarter,
    GatewayStarter,
    Reply,
    SettingsFactory,
    chat_events,
    new_key,
    post_chat,
)
from redis_processes import RedisProcess, redis_processes, start_redis

from proxy.completions import CompletionRecorder
from proxy.demo.keys import DemoKeys
from proxy.demo.provider import DemoConfig, serve_demo_provider
from proxy.metrics import Metrics
from proxy.routing import Target
from proxy.server import RunningGateway
from registry import CompletionRecord, MemoryRegistry

UNAVAILABLE = (
    b'{"error":{"message":"The model is currently unavailable. Please try again later.",'
    b'"type":"bad_gateway","param":null,"code":null}}'
)


def _first_id(body: bytes) -> str:
    """Return the completion id of a JSON body or of the first event of a stream."""
    if body.startswith(b"data:"):
        first = body.split(b"\n\n", 1)[0][len(b"data:") :]
        chat_id: str = orjson.loads(first)["id"]
    else:
        chat_id = orjson.loads(body)["id"]
    return chat_id


async def _signature(
    http: aiohttp.ClientSession, gateway: RunningGateway, chat_id: str
) -> tuple[int, bytes]:
    async with http.get(
        f"{gateway.url}/v1/signature/{chat_id}",
        params={"model": MODEL, "signing_algo": "ed25519"},
    ) as response:
        return response.status, await response.read()


@pytest.fixture
async def replicas(
    redis_server: Any, make_settings: SettingsFactory, start_gateway_with: GatewayStarter
) -> tuple[RunningGateway, RunningGateway]:
    """Two gateway replicas sharing one real redis-server under a fresh key prefix."""
    prefix = f"sig-{secrets.token_hex(4)}"
    settings = make_settings(registry_url=redis_server.url, redis_prefix=prefix)
    return await start_gateway_with(settings), await start_gateway_with(settings)


async def test_fetch_reaches_serving_provider_on_any_replica(
    replicas: tuple[RunningGateway, RunningGateway],
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
) -> None:
    keys = DemoKeys.from_seed(b"shared by two providers")
    pubkey = keys.public_key_hex("ed25519")
    providers = [await start_demo(DemoConfig(keys=keys)) for _ in range(2)]
    for provider in providers:
        await Admin(http, replicas[0].admin_url).register(pubkey, provider.url)
    verifier = Ed25519PublicKey.from_public_bytes(bytes.fromhex(pubkey))

    served: list[tuple[str, bytes, bytes, int]] = []
    for index in range(100):
        stream = index % 2 == 0
        pinned = index % 4 < 2
        body = orjson.dumps(
            {
                "model": MODEL,
                "stream": stream,
                "messages": [{"role": "user", "content": str(index)}],
            }
        )
        answer = await post_chat(
            http, replicas[index % 2], pubkey=pubkey if pinned else None, body=body
        )
        assert answer.status == 200, answer.body
        served.append((_first_id(answer.body), body, answer.body, index % 2))

    misses = 0
    for chat_id, request_body, response_body, replica in served:
        status, raw = await _signature(http, replicas[1 - replica], chat_id)
        if status != 200:
            misses += 1
            continue
        signed = orjson.loads(raw)
        expected = (
            f"{MODEL}:{hashlib.sha256(request_body).hexdigest()}"
            f":{hashlib.sha256(response_body).hexdigest()}"
        )
        assert signed["text"] == expected
        verifier.verify(bytes.fromhex(signed["signature"]), expected.encode())

    assert misses == 0
    assert all(provider.state.signatures for provider in providers)


async def test_expired_record_gets_404(
    redis_server: Any,
    make_settings: SettingsFactory,
    start_gateway_with: GatewayStarter,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_gateway_with(
        make_settings(
            registry_url=redis_server.url,
            redis_prefix=f"sig-{secrets.token_hex(4)}",
            signature_ttl_s=0.2,
        )
    )
    demo = await start_demo()
    pubkey = demo.config.keys.public_key_hex("ed25519")
    await Admin(http, gateway.admin_url).register(pubkey, demo.url)
    answer = await post_chat(http, gateway, pubkey=pubkey)
    chat_id = _first_id(answer.body)

    await asyncio.sleep(0.3)
    status, raw = await _signature(http, gateway, chat_id)

    assert status == 404
    error = orjson.loads(raw)["error"]
    assert error["code"] == "chat_not_found"
    assert error["type"] == "invalid_request_error"


async def test_unknown_chat_id_gets_404_after_patience(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, raw = await _signature(http, gateway, "chatcmpl-unknown")
    waited = loop.time() - started

    assert status == 404
    assert orjson.loads(raw)["error"]["code"] == "chat_not_found"
    assert waited >= 0.45


@pytest.mark.parametrize("chat_id", ["bad id", "x" * 300, "semi;colon", "%00"])
async def test_malformed_chat_id_gets_400(
    gateway: RunningGateway, http: aiohttp.ClientSession, chat_id: str
) -> None:
    status, raw = await _signature(http, gateway, chat_id)

    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error["code"] == "invalid_chat_id"
    assert error["param"] == "chat_id"


async def test_gone_provider_gets_exact_502(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with serve_demo_provider(DemoConfig()) as demo:
        pubkey = demo.config.keys.public_key_hex("ed25519")
        await Admin(http, gateway.admin_url).register(pubkey, demo.url)
        chat_id = _first_id((await post_chat(http, gateway, pubkey=pubkey)).body)

    status, raw = await _signature(http, gateway, chat_id)

    assert status == 502
    assert raw == UNAVAILABLE


async def test_query_and_request_hash_pass_unchanged(
    gateway: RunningGateway, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    fake = await start_fake()
    pubkey = new_key()
    await Admin(http, gateway.admin_url).register(pubkey, fake.url)
    answer = await post_chat(http, gateway, pubkey=pubkey, headers=[("X-Request-Hash", "ab" * 32)])
    chat_id = _first_id(answer.body)
    fake.then(Reply(headers=(("Content-Type", "application/json"),), chunks=(b'{"ok":1}',)))

    async with http.get(
        f"{gateway.url}/v1/signature/{chat_id}?model={MODEL}&signing_algo=ecdsa&x=1"
    ) as response:
        relayed = await response.read()

    assert fake.served[0].headers["X-Request-Hash"] == "ab" * 32
    assert fake.served[1].path == f"/v1/signature/{chat_id}"
    assert fake.served[1].query == f"model={MODEL}&signing_algo=ecdsa&x=1"
    assert relayed == b'{"ok":1}'


async def test_recording_leaves_bytes_unchanged(
    gateway: RunningGateway, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    events = tuple(chat_events(5))
    fake = await start_fake(Reply(chunks=events))
    pubkey = new_key()
    await Admin(http, gateway.admin_url).register(pubkey, fake.url)

    answer = await post_chat(http, gateway, pubkey=pubkey)

    assert answer.body == b"".join(events)
    assert bytes(fake.served[0].sent) == answer.body


@pytest.fixture
async def frozen_redis_gateway(
    tmp_path: Path,
    make_settings: SettingsFactory,
    start_gateway_with: GatewayStarter,
) -> AsyncIterator[tuple[RunningGateway, RedisProcess]]:
    """A gateway on a private redis-server that the test may freeze (stopped by PID after)."""
    with redis_processes() as started:
        server = start_redis(tmp_path / "redis")
        started.append(server)
        yield (
            await start_gateway_with(
                make_settings(
                    registry_url=server.url, redis_timeout_s=0.2, registry_outage_grace_s=30
                )
            ),
            server,
        )


async def test_completion_succeeds_while_record_write_fails(
    frozen_redis_gateway: tuple[RunningGateway, RedisProcess],
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway, server = frozen_redis_gateway
    demo = await start_demo()
    pubkey = demo.config.keys.public_key_hex("ed25519")
    admin = Admin(http, gateway.admin_url)
    await admin.register(pubkey, demo.url)

    server.freeze()
    answer = await post_chat(http, gateway, pubkey=pubkey)
    deadline = asyncio.get_running_loop().time() + 5
    failed = 0.0
    while failed < 1 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        failed = (await admin.metrics()).get(
            ("e2ee_gateway_completion_records_total", (("result", "failed"),)), 0.0
        )

    assert answer.status == 200
    assert answer.body.endswith(b"data: [DONE]\n\n") or answer.body.startswith(b"{")
    assert failed == 1


async def test_fetch_on_same_replica_needs_no_write(
    frozen_redis_gateway: tuple[RunningGateway, RedisProcess],
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
) -> None:
    # With Redis frozen the record's write cannot land, yet the replica that served the
    # completion still finds its provider while the write is pending.
    gateway, server = frozen_redis_gateway
    demo = await start_demo()
    pubkey = demo.config.keys.public_key_hex("ed25519")
    await Admin(http, gateway.admin_url).register(pubkey, demo.url)

    server.freeze()
    answer = await post_chat(http, gateway, pubkey=pubkey)
    status, raw = await _signature(http, gateway, _first_id(answer.body))

    assert answer.status == 200
    assert status == 200, raw
    assert orjson.loads(raw)["signing_algo"] == "ed25519"


async def test_records_within_interval_share_one_write() -> None:
    written: list[list[str]] = []

    class CountingRegistry(MemoryRegistry):
        async def record_completions(
            self, records: Sequence[tuple[str, CompletionRecord]], ttl_s: float
        ) -> None:
            written.append([chat_id for chat_id, _ in records])
            await super().record_completions(records, ttl_s)

    registry = CountingRegistry()
    recorder = CompletionRecorder(registry, Metrics(), 60, flush_interval_s=0.05)
    target = Target("http://192.0.2.1:8000", new_key())
    for index in range(30):
        recorder.record(f"chatcmpl-{index}", target, MODEL)
        await asyncio.sleep(0)

    assert recorder.pending("chatcmpl-7") == CompletionRecord(target.url, target.pubkey, MODEL)
    await recorder.aclose()
    assert written == [[f"chatcmpl-{index}" for index in range(30)]]
    assert recorder.pending("chatcmpl-7") is None
    assert await registry.find_completion("chatcmpl-29") is not None
