"""Malformed client requests and admin calls get the OpenAI error envelope, never a 500."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from gateway_harness import (
    ADMIN_TOKEN,
    MODEL,
    OTHER_PROVIDER_TOKEN,
    PROVIDER_TOKEN,
    Admin,
    FakeClock,
    FakeStarter,
    Fetched,
    GatewayStarter,
    SettingsFactory,
    chat_body,
    fetch,
    new_key,
    post_chat,
)

from proxy.server import RunningGateway

ED25519_KEY = "ab" * 32
ECDSA_KEY = "cd" * 64
PROVIDER_URL = "http://127.0.0.1:9"


def assert_envelope(
    answer: Fetched, status: int, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """Check an error response against the envelope and return its ``error`` object."""
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"] == "application/json"
    assert "X-Request-Id" in answer.headers
    body = answer.json()
    assert list(body) == ["error"]
    error: dict[str, Any] = body["error"]
    assert list(error) == ["message", "type", "param", "code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["type"] == type_
    assert error["code"] == code
    assert error["param"] == param
    return error


def heartbeat_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "pubkey": ED25519_KEY, "model": MODEL, "url": PROVIDER_URL, "signing_algo": "ed25519",
    }
    body.update(changes)
    return {name: value for name, value in body.items() if value is not None}


# Client requests: E2EE headers.


@pytest.mark.parametrize(
    "value",
    ["g" * 64, "ab" * 31 + "a", "ab" * 33, "05" + "ab" * 64, "", "ab" * 16],
    ids=["not-hex", "63-chars", "66-chars", "130-without-04", "empty", "32-chars"],
)
async def test_model_pub_key_malformed_rejected(
    gateway: RunningGateway, http: aiohttp.ClientSession, value: str
) -> None:
    answer = await post_chat(http, gateway, pubkey=value)

    assert_envelope(answer, 400, "invalid_request_error", "invalid_header", "X-Model-Pub-Key")


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({"X-Signing-Algo": "rsa", "X-Client-Pub-Key": ED25519_KEY}, "X-Signing-Algo"),
        ({"X-Client-Pub-Key": ED25519_KEY}, "X-Signing-Algo"),
        ({"X-Signing-Algo": "ed25519"}, "X-Client-Pub-Key"),
        ({"X-Signing-Algo": "ed25519", "X-Client-Pub-Key": ECDSA_KEY}, "X-Client-Pub-Key"),
        ({"X-Signing-Algo": "ecdsa", "X-Client-Pub-Key": "05" + ECDSA_KEY}, "X-Client-Pub-Key"),
        ({"X-Signing-Algo": "ecdsa", "X-Client-Pub-Key": "zz" * 64}, "X-Client-Pub-Key"),
        ({"X-Encryption-Version": "3"}, "X-Encryption-Version"),
        ({"X-Encryption-Version": "v1"}, "X-Encryption-Version"),
        (
            {
                "X-Signing-Algo": "ecdsa",
                "X-Client-Pub-Key": ECDSA_KEY,
                "X-Model-Pub-Key": ED25519_KEY,
            },
            "X-Signing-Algo",
        ),
    ],
    ids=[
        "unknown-algo",
        "client-key-without-algo",
        "algo-without-client-key",
        "ed25519-client-key-length",
        "ecdsa-130-without-04",
        "client-key-not-hex",
        "version-3",
        "version-text",
        "algo-contradicts-model-key",
    ],
)
async def test_e2ee_header_malformed_rejected(
    gateway: RunningGateway, http: aiohttp.ClientSession, headers: dict[str, str], param: str
) -> None:
    answer = await post_chat(http, gateway, headers=headers.items())

    assert_envelope(answer, 400, "invalid_request_error", "invalid_header", param)


async def test_request_id_echoed_on_errors(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    well_formed = await post_chat(
        http, gateway, pubkey="xyz", headers=[("X-Request-Id", "req-1.a:b_c")]
    )
    malformed = await post_chat(http, gateway, pubkey="xyz", headers=[("X-Request-Id", "bad id!")])

    assert well_formed.headers["X-Request-Id"] == "req-1.a:b_c"
    assert malformed.headers["X-Request-Id"] != "bad id!"
    assert malformed.headers["X-Request-Id"]


# Client requests: bodies and models.


@pytest.mark.parametrize(
    "body", [b"not json", b'{"model": "m"', b"", b'["model"]', b'"text"'],
    ids=["text", "truncated", "empty", "array", "string"],
)
async def test_body_not_json_object_rejected(
    gateway: RunningGateway, http: aiohttp.ClientSession, body: bytes
) -> None:
    answer = await post_chat(http, gateway, body=body)

    assert_envelope(answer, 400, "invalid_request_error", "invalid_json")


@pytest.mark.parametrize(
    "model", [None, 42, ["demo-model"], "", {"id": "x"}],
    ids=["missing", "number", "list", "empty", "object"],
)
async def test_model_missing_or_not_string_rejected(
    gateway: RunningGateway, http: aiohttp.ClientSession, model: Any
) -> None:
    body: dict[str, Any] = {"messages": []}
    if model is not None:
        body["model"] = model

    answer = await post_chat(http, gateway, body=body)

    assert_envelope(answer, 400, "invalid_request_error", "missing_model", "model")


async def test_unknown_model_gets_404(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    answer = await post_chat(http, gateway, body=chat_body(model="no-such-model"))

    assert_envelope(answer, 404, "invalid_request_error", "model_not_found", "model")


async def test_model_without_live_provider_gets_503(
    gateway: RunningGateway,
    admin: Admin,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    fake = await start_fake()
    await admin.register(new_key(), fake.url, ttl_s=5)
    clock.advance(5.001)

    answer = await post_chat(http, gateway)

    assert_envelope(answer, 503, "service_unavailable", "no_live_provider")
    assert fake.requests == 0


async def test_model_unseen_for_a_day_gets_404(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter,
    http: aiohttp.ClientSession, clock: FakeClock,
) -> None:
    fake = await start_fake()
    await admin.register(new_key(), fake.url, ttl_s=5)
    clock.advance(24 * 3600 + 1)

    answer = await post_chat(http, gateway)

    assert_envelope(answer, 404, "invalid_request_error", "model_not_found", "model")


@pytest.mark.parametrize("listener", ["public", "admin"])
async def test_unknown_route_gets_404(
    gateway: RunningGateway, http: aiohttp.ClientSession, listener: str
) -> None:
    base = gateway.url if listener == "public" else gateway.admin_url

    answer = await fetch(http, "GET", base + "/v1/nothing-here")

    assert_envelope(answer, 404, "invalid_request_error", "not_found")


async def test_wrong_method_gets_405(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    answer = await fetch(http, "GET", gateway.url + "/v1/chat/completions")

    assert_envelope(answer, 405, "invalid_request_error", None)
    assert "POST" in answer.headers["Allow"]


# Heartbeats.


@pytest.mark.parametrize("field", ["pubkey", "model", "url", "signing_algo"])
async def test_heartbeat_missing_field_rejected(admin: Admin, field: str) -> None:
    body = heartbeat_body()
    del body[field]

    answer = await admin.heartbeat(body)

    error = assert_envelope(answer, 400, "invalid_request_error", "invalid_field", field)
    assert field in error["message"]


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"pubkey": "zz" * 32}, "pubkey"),
        ({"pubkey": ECDSA_KEY}, "pubkey"),
        ({"pubkey": 12}, "pubkey"),
        ({"signing_algo": "rsa"}, "signing_algo"),
        ({"model": "bad\nmodel"}, "model"),
        ({"model": "m" * 257}, "model"),
        ({"instance_id": "has space"}, "instance_id"),
        ({"instance_id": 7}, "instance_id"),
        ({"ttl_s": "10"}, "ttl_s"),
        ({"ttl_s": True}, "ttl_s"),
        ({"ttl_s": [5]}, "ttl_s"),
        ({"ttl_s": {}}, "ttl_s"),
    ],
    ids=[
        "pubkey-not-hex",
        "pubkey-length-not-algo",
        "pubkey-number",
        "algo-unknown",
        "model-control-char",
        "model-too-long",
        "instance-id-space",
        "instance-id-number",
        "ttl-string",
        "ttl-bool",
        "ttl-list",
        "ttl-object",
    ],
)
async def test_heartbeat_invalid_field_rejected(
    admin: Admin, changes: dict[str, Any], param: str
) -> None:
    answer = await admin.heartbeat(heartbeat_body(**changes))

    assert_envelope(answer, 400, "invalid_request_error", "invalid_field", param)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1:21",
        "http://",
        "http:///v1",
        "http://user:secret@127.0.0.1:8000",
        "http://127.0.0.1:8000/?a=b",
        "http://192.0.2.1:8000",
        "http://provider.example.invalid",
    ],
    ids=[
        "ftp", "no-host", "empty-host", "credentials", "query",
        "not-allowed-ip", "not-allowed-name",
    ],
)
async def test_heartbeat_bad_url_rejected(admin: Admin, url: str) -> None:
    answer = await admin.heartbeat(heartbeat_body(url=url))

    error = assert_envelope(answer, 400, "invalid_request_error", "invalid_field", "url")
    assert "secret" not in error["message"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://localhost:8000",
        "http://[::1]:8000",
        "http://169.254.169.254",
        "http://[fe80::1]:8000",
        "http://0.0.0.0:8000",
    ],
    ids=["loopback", "localhost", "loopback-v6", "metadata", "link-local-v6", "unspecified"],
)
async def test_heartbeat_default_policy_rejects_local_url(
    make_settings: SettingsFactory,
    start_gateway_with: GatewayStarter,
    http: aiohttp.ClientSession,
    url: str,
) -> None:
    running = await start_gateway_with(make_settings(allowed_provider_hosts=()))

    answer = await Admin(http, running.admin_url).heartbeat(heartbeat_body(url=url))

    assert_envelope(answer, 400, "invalid_request_error", "invalid_field", "url")


async def test_heartbeat_default_policy_accepts_public_url(
    make_settings: SettingsFactory,
    start_gateway_with: GatewayStarter,
    http: aiohttp.ClientSession,
) -> None:
    running = await start_gateway_with(make_settings(allowed_provider_hosts=()))

    answer = await Admin(http, running.admin_url).heartbeat(
        heartbeat_body(url="http://192.0.2.1:8000")
    )

    assert answer.status == 200


@pytest.mark.parametrize(
    ("ttl_s", "expires_in_s"), [(None, 30), (1, 5), (1000, 300), (42, 42), (-3, 5)]
)
async def test_heartbeat_ttl_clamped(
    admin: Admin, ttl_s: float | None, expires_in_s: float
) -> None:
    answer = await admin.heartbeat(heartbeat_body(ttl_s=ttl_s))

    lease = answer.json()
    assert answer.status == 200
    assert lease["expires_in_s"] == expires_in_s
    assert lease["heartbeat_interval_s"] == pytest.approx(expires_in_s / 3, abs=0.001)


@pytest.mark.parametrize("body", [b"{", b"[]", b"null"], ids=["truncated", "array", "null"])
async def test_heartbeat_body_not_json_object_rejected(admin: Admin, body: bytes) -> None:
    answer = await admin.heartbeat(body)

    assert_envelope(answer, 400, "invalid_request_error", "invalid_json")


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", "Basic " + PROVIDER_TOKEN, "Bearer ", "Bearer " + ADMIN_TOKEN],
    ids=["missing", "unknown", "basic-scheme", "empty", "admin-token"],
)
async def test_heartbeat_without_provider_token_gets_401(
    gateway: RunningGateway, http: aiohttp.ClientSession, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    answer = await fetch(
        http, "POST", gateway.admin_url + "/v1/providers/heartbeat",
        json=heartbeat_body(), headers=headers,
    )

    assert_envelope(answer, 401, "invalid_request_error", "invalid_api_key")


async def test_heartbeat_registration_disabled_gets_401(
    make_settings: SettingsFactory,
    start_gateway_with: GatewayStarter,
    http: aiohttp.ClientSession,
) -> None:
    running = await start_gateway_with(make_settings(provider_tokens_file=None))

    answer = await Admin(http, running.admin_url).heartbeat(heartbeat_body())

    error = assert_envelope(answer, 401, "invalid_request_error", "invalid_api_key")
    assert "disabled" in error["message"]
    assert "GATEWAY_PROVIDER_TOKENS_FILE" in error["message"]


async def test_heartbeat_owner_conflict_gets_409(admin: Admin) -> None:
    await admin.register(ED25519_KEY, PROVIDER_URL)

    answer = await admin.heartbeat(heartbeat_body(), token=OTHER_PROVIDER_TOKEN)

    assert_envelope(answer, 409, "invalid_request_error", "conflict")


async def test_heartbeat_model_conflict_gets_409(admin: Admin) -> None:
    await admin.register(ED25519_KEY, PROVIDER_URL)

    answer = await admin.heartbeat(heartbeat_body(model="another-model"))

    error = assert_envelope(answer, 409, "invalid_request_error", "conflict", "model")
    assert MODEL in error["message"]


# Deregistration and listing.


async def delete_key(
    admin: Admin, pubkey: str, token: str | None, url: str | None = None
) -> Fetched:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    params = {} if url is None else {"url": url}
    return await fetch(
        admin.http, "DELETE", f"{admin.url}/v1/providers/{pubkey}", headers=headers, params=params
    )


async def listed_urls(admin: Admin) -> list[str]:
    listing = await fetch(
        admin.http, "GET", admin.url + "/v1/providers",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert listing.status == 200
    return [ep["url"] for entry in listing.json()["data"] for ep in entry["endpoints"]]


async def test_deregister_by_owner_gets_204(admin: Admin) -> None:
    await admin.register(ED25519_KEY, PROVIDER_URL)

    answer = await delete_key(admin, ED25519_KEY, PROVIDER_TOKEN, url=PROVIDER_URL)

    assert answer.status == 204
    assert "X-Request-Id" in answer.headers
    assert await listed_urls(admin) == []


async def test_deregister_by_other_identity_gets_403(admin: Admin) -> None:
    await admin.register(ED25519_KEY, PROVIDER_URL)

    answer = await delete_key(admin, ED25519_KEY, OTHER_PROVIDER_TOKEN)

    assert_envelope(answer, 403, "invalid_request_error", "forbidden")
    assert await listed_urls(admin) == [PROVIDER_URL]


async def test_deregister_unknown_key_gets_404(admin: Admin) -> None:
    answer = await delete_key(admin, ED25519_KEY, PROVIDER_TOKEN)

    assert_envelope(answer, 404, "invalid_request_error", "key_not_found")


async def test_deregister_by_admin_gets_204(admin: Admin) -> None:
    await admin.register(ED25519_KEY, PROVIDER_URL)
    await admin.register(ED25519_KEY, "http://127.0.0.1:10", token=OTHER_PROVIDER_TOKEN)

    answer = await delete_key(admin, ED25519_KEY, ADMIN_TOKEN)

    assert answer.status == 204
    assert await listed_urls(admin) == []


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [(None, 401, "invalid_api_key"), ("wrong", 401, "invalid_api_key")],
    ids=["no-token", "unknown-token"],
)
async def test_deregister_without_valid_token_rejected(
    admin: Admin, token: str | None, status: int, code: str
) -> None:
    await admin.register(ED25519_KEY, PROVIDER_URL)

    answer = await delete_key(admin, ED25519_KEY, token)

    assert_envelope(answer, status, "invalid_request_error", code)
    assert await listed_urls(admin) == [PROVIDER_URL]


async def test_deregister_malformed_key_rejected(admin: Admin) -> None:
    answer = await delete_key(admin, "not-a-key", PROVIDER_TOKEN)

    assert_envelope(answer, 400, "invalid_request_error", "invalid_field", "pubkey")


@pytest.mark.parametrize(
    "token", [None, PROVIDER_TOKEN, "wrong"], ids=["no-token", "provider-token", "unknown"]
)
async def test_list_providers_without_admin_token_gets_401(
    admin: Admin, token: str | None
) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}

    answer = await fetch(admin.http, "GET", admin.url + "/v1/providers", headers=headers)

    assert_envelope(answer, 401, "invalid_request_error", "invalid_api_key")
