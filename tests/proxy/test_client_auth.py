"""Client API keys, the per-key concurrency cap and the failed token attempt limit."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import pytest
from gateway_harness import (
    Admin,
    DemoStarter,
    FakeStarter,
    GatewayStarter,
    Reply,
    SettingsFactory,
    chat_body,
    chat_events,
    new_key,
)

from proxy.auth import TokenFileError
from proxy.clientauth import FailedAuthLimiter, load_client_keys
from proxy.errors import RateLimited
from proxy.server import RunningGateway

CLIENT_KEY = "sk-test-client-key"


@pytest.fixture
def client_keys_file(tmp_path: Path) -> Path:
    digest = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    path = tmp_path / "client-keys"
    path.write_text(f"# name sha256\nteam-a {digest}\n", encoding="utf-8")
    return path


async def _gateway_with_keys(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    client_keys_file: Path,
    **overrides: object,
) -> RunningGateway:
    return await start_gateway_with(
        make_settings(client_keys_file=str(client_keys_file), **overrides)
    )


async def test_missing_client_key_gets_401(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    client_keys_file: Path,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await _gateway_with_keys(start_gateway_with, make_settings, client_keys_file)

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        response = await http.post(
            gateway.url + "/v1/chat/completions", json=chat_body(), headers=headers
        )
        body = await response.json()
        assert response.status == 401
        assert body["error"]["code"] == "invalid_api_key"
        assert body["error"]["type"] == "invalid_request_error"


async def test_health_needs_no_client_key(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    client_keys_file: Path,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await _gateway_with_keys(start_gateway_with, make_settings, client_keys_file)

    assert (await http.get(gateway.url + "/healthz")).status == 200
    assert (await http.get(gateway.url + "/readyz")).status == 200


async def test_valid_client_key_routed_without_leaking(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    client_keys_file: Path,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await _gateway_with_keys(start_gateway_with, make_settings, client_keys_file)
    fake = await start_fake()
    await Admin(http, gateway.admin_url).register(new_key(), fake.url)

    response = await http.post(
        gateway.url + "/v1/chat/completions",
        json=chat_body(),
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    await response.read()

    assert response.status == 200
    assert "Authorization" not in fake.served[0].headers


async def test_concurrency_cap_gets_429(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    client_keys_file: Path,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await _gateway_with_keys(
        start_gateway_with, make_settings, client_keys_file, client_concurrency=1
    )
    release = asyncio.Event()
    fake = await start_fake(Reply(chunks=tuple(chat_events(2)), hold=release))
    await Admin(http, gateway.admin_url).register(new_key(), fake.url)
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}

    first = asyncio.create_task(
        http.post(gateway.url + "/v1/chat/completions", json=chat_body(), headers=headers)
    )
    await fake.wait_for_requests(1)
    second = await http.post(
        gateway.url + "/v1/chat/completions", json=chat_body(), headers=headers
    )
    body = await second.json()
    release.set()
    first_response = await first
    await first_response.read()
    third = await http.post(gateway.url + "/v1/chat/completions", json=chat_body(), headers=headers)
    await third.read()

    assert second.status == 429
    assert body["error"]["code"] == "concurrency_limit"
    assert body["error"]["type"] == "rate_limit_exceeded"
    assert second.headers["Retry-After"] == "1"
    assert first_response.status == 200
    assert third.status == 200


async def test_failed_token_attempts_get_429(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    client_keys_file: Path,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await _gateway_with_keys(
        start_gateway_with, make_settings, client_keys_file, auth_failure_limit=3
    )

    statuses = []
    for _ in range(4):
        response = await http.post(
            gateway.url + "/v1/chat/completions",
            json=chat_body(),
            headers={"Authorization": "Bearer guess"},
        )
        statuses.append(response.status)
        last = await response.json()
    valid_but_blocked = await http.post(
        gateway.url + "/v1/chat/completions",
        json=chat_body(),
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )

    assert statuses == [401, 401, 401, 429]
    assert last["error"]["code"] == "too_many_failed_auth"
    assert valid_but_blocked.status == 429
    assert int(valid_but_blocked.headers["Retry-After"]) >= 1


async def test_admin_token_guessing_gets_429(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_gateway_with(make_settings(auth_failure_limit=2))
    admin = Admin(http, gateway.admin_url)

    first = await admin.heartbeat({"pubkey": new_key()}, token="guess-1")
    second = await admin.heartbeat({"pubkey": new_key()}, token="guess-2")
    third = await http.get(
        gateway.admin_url + "/v1/providers", headers={"Authorization": "Bearer guess-3"}
    )

    assert first.status == 401
    assert second.status == 401
    assert third.status == 429


def test_failed_auth_window_expires() -> None:
    now = [0.0]
    limiter = FailedAuthLimiter(2, 10.0, clock=lambda: now[0])
    limiter.record_failure("192.0.2.1")
    limiter.record_failure("192.0.2.1")

    with pytest.raises(RateLimited):
        limiter.check("192.0.2.1")
    limiter.check("192.0.2.2")
    now[0] = 10.5
    limiter.check("192.0.2.1")


def test_client_keys_file_rejects_plain_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("team-a sk-plaintext-key\n", encoding="utf-8")

    with pytest.raises(TokenFileError, match="sha256"):
        load_client_keys(str(path))


async def test_demo_routable_with_client_key(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    client_keys_file: Path,
    start_demo: DemoStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await _gateway_with_keys(start_gateway_with, make_settings, client_keys_file)
    demo = await start_demo()
    await Admin(http, gateway.admin_url).register(
        demo.config.keys.public_key_hex("ed25519"), demo.url
    )

    models = await http.get(
        gateway.url + "/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEY}"}
    )

    assert models.status == 200
    assert [m["id"] for m in (await models.json())["data"]] == ["demo-model"]
