"""Provider statuses: which ones become the fixed 502, and which ones leave a provider eligible."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import aiohttp
import pytest
from gateway_harness import (
    MODEL,
    Admin,
    DemoStarter,
    FakeStarter,
    GatewayStarter,
    Reply,
    new_key,
    post_chat,
)

from proxy.demo.provider import DemoConfig
from proxy.server import RunningGateway

COMPLETIONS = "/v1/chat/completions"

UNAVAILABLE_BODY = (
    b'{"error":{"message":"The model is currently unavailable. Please try again later.",'
    b'"type":"bad_gateway","param":null,"code":null}}'
)


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_auth_rejection_gets_502_and_error_log(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    caplog.set_level(logging.INFO)
    demo = await start_demo(DemoConfig(model=MODEL, status=status))
    key = demo.config.keys.public_key_hex("ed25519")
    await admin.register(key, demo.url)

    answer = await post_chat(http, gateway, pubkey=key)

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert answer.status == 502
    assert answer.body == UNAVAILABLE_BODY
    assert answer.headers["Content-Type"] == "application/json"
    # Credentials do not get better on a retry.
    assert demo.state.requests[COMPLETIONS] == 1
    assert len(errors) == 1
    assert errors[0].name == "proxy.forward"
    assert str(status) in errors[0].getMessage()
    assert errors[0].exc_info is None


@pytest.mark.parametrize("status", [502, 504])
async def test_upstream_gateway_errors_retried_then_502(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
    status: int,
) -> None:
    demo = await start_demo(DemoConfig(model=MODEL, status=status))
    key = demo.config.keys.public_key_hex("ed25519")
    await admin.register(key, demo.url)

    answer = await post_chat(http, gateway, pubkey=key)

    assert answer.status == 502
    assert answer.body == UNAVAILABLE_BODY
    assert demo.state.requests[COMPLETIONS] == 3


@pytest.mark.parametrize("status", [502, 504])
async def test_upstream_gateway_error_once_then_served(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
    status: int,
) -> None:
    demo = await start_demo(DemoConfig(model=MODEL, status=status, fail_next=1))
    key = demo.config.keys.public_key_hex("ed25519")
    await admin.register(key, demo.url)

    answer = await post_chat(http, gateway, pubkey=key)

    assert answer.status == 200
    assert answer.body.endswith(b"data: [DONE]\n\n")
    assert demo.state.requests[COMPLETIONS] == 2


@pytest.mark.parametrize("status", [429, 503])
async def test_backpressure_keeps_provider_eligible(
    gateway: RunningGateway,
    admin: Admin,
    start_demo: DemoStarter,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
    status: int,
) -> None:
    pushing_back = await start_demo(DemoConfig(model=MODEL, status=status, fail_next=5))
    pushing_back_key = pushing_back.config.keys.public_key_hex("ed25519")
    other = await start_fake()
    other_key = new_key()
    await admin.register(pushing_back_key, pushing_back.url)
    await admin.register(other_key, other.url)

    statuses = [(await post_chat(http, gateway, pubkey=pushing_back_key)).status for _ in range(5)]
    # One request held on the other provider: balancing now prefers the one that
    # pushed back, unless those responses ejected it.
    release = asyncio.Event()
    other.then(Reply(hold=release))
    held_request = asyncio.create_task(
        post_chat(http, gateway, pubkey=other_key), name="held-request"
    )
    await other.wait_for_requests(1)
    unpinned = await post_chat(http, gateway)
    release.set()
    held_answer = await held_request

    assert statuses == [status] * 5
    assert unpinned.status == 200
    assert held_answer.status == 200
    assert pushing_back.state.requests[COMPLETIONS] == 6
    assert other.requests == 1


async def test_large_json_answer_relayed_as_it_arrives(
    start_gateway_with: GatewayStarter,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    """An answer over the held-body limit is streamed through byte for byte."""
    gateway = await start_gateway_with()
    body = b'{"data":"' + b"x" * (9 * 1024 * 1024) + b'"}'
    fake = await start_fake(
        Reply(headers=(("Content-Type", "application/json"),), chunks=(body[:4096], body[4096:]))
    )
    await Admin(http, gateway.admin_url).register(new_key(), fake.url)

    response = await http.post(
        gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "hello"}
    )
    received = await response.read()

    assert response.status == 200
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(body).hexdigest()
    assert response.headers.get("Cache-Control") != "no-cache"
