"""Security properties not covered elsewhere: provider address checks, binds, token compares.

- A provider host name that resolves to a forbidden address is refused when the
  gateway connects, so no TCP connection reaches that address. The forwarding client
  checks the addresses itself; ``GuardedResolver`` does it for aiohttp's session.
- Registration checks the URL as text: it neither resolves nor connects.
- Both listeners bind 127.0.0.1 unless configured otherwise.
- Tokens are compared with ``hmac.compare_digest`` against every configured token.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from fuzz_harness import FUZZ_SETTINGS
from gateway_harness import (
    MODEL,
    Admin,
    GatewayStarter,
    SettingsFactory,
    new_key,
    post_chat,
)
from hypothesis import given
from hypothesis import strategies as st
from relay_harness import RawProvider

from proxy.auth import TokenStore
from proxy.config import Settings
from proxy.server import start_gateway
from proxy.urlcheck import AddressPolicy, ForbiddenAddress, GuardedResolver
from registry import MemoryRegistry

TEST_HOST = "provider.test"
UNAVAILABLE_BODY = (
    b'{"error":{"message":"The model is currently unavailable. Please try again later.",'
    b'"type":"bad_gateway","param":null,"code":null}}'
)
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


# Addresses checked at connect time.


class MappedResolver(AbstractResolver):
    """Resolves the names it maps to fixed addresses, without DNS, and counts lookups."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = addresses
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups += 1
        if host not in self.addresses:
            raise OSError(f"{host} is not mapped")
        return [
            ResolveResult(
                hostname=host,
                host=self.addresses[host],
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def getaddrinfo(self, host: str, port: int, **_: Any) -> list[Any]:
        """Stand in for ``loop.getaddrinfo``, which the forwarding client resolves with."""
        self.lookups += 1
        if host not in self.addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not mapped")
        address = (self.addresses[host], port)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address)]

    async def close(self) -> None:
        pass


# The forwarding client resolves with the loop's getaddrinfo. The two cases without
# 127.0.0.1 in the allow-list must not connect. The last one shows that the mapped name
# does reach the provider when its address is allowed.
RESOLVE_CASES = {
    "name-allowed-address-not": ((TEST_HOST,), 502),
    "default-policy": ((), 502),
    "name-and-address-allowed": ((TEST_HOST, "127.0.0.1/32"), 200),
}


@pytest.mark.parametrize(
    ("allowed_hosts", "status"), RESOLVE_CASES.values(), ids=RESOLVE_CASES.keys()
)
async def test_forwarding_to_name_checks_resolved_address(
    make_settings: SettingsFactory,
    start_gateway_with: GatewayStarter,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    allowed_hosts: tuple[str, ...],
    status: int,
) -> None:
    mapped = MappedResolver({TEST_HOST: "127.0.0.1"})
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", mapped.getaddrinfo)
    gateway = await start_gateway_with(make_settings(allowed_provider_hosts=allowed_hosts))
    key = new_key()

    async with RawProvider(OK_RESPONSE) as provider:
        port = provider.url.rsplit(":", 1)[1]
        await Admin(http, gateway.admin_url).register(key, f"http://{TEST_HOST}:{port}")
        answer = await post_chat(http, gateway, pubkey=key, body=orjson.dumps({"model": MODEL}))

        assert answer.status == status
        assert mapped.lookups >= 1
        assert provider.connections == (1 if status == 200 else 0)
    if status == 502:
        assert answer.body == UNAVAILABLE_BODY


@pytest.mark.parametrize(
    ("allowed_hosts", "status"), RESOLVE_CASES.values(), ids=RESOLVE_CASES.keys()
)
async def test_guarded_resolver_checks_resolved_address(
    allowed_hosts: tuple[str, ...], status: int
) -> None:
    """aiohttp's session (attestation report fetches) gets the same check from GuardedResolver."""
    mapped = MappedResolver({TEST_HOST: "127.0.0.1"})
    resolver = GuardedResolver(AddressPolicy.from_allow_list(allowed_hosts), mapped)

    if status == 200:
        results = await resolver.resolve(TEST_HOST, 443)
        assert [result["host"] for result in results] == ["127.0.0.1"]
    else:
        with pytest.raises(ForbiddenAddress, match="resolves only to forbidden addresses"):
            await resolver.resolve(TEST_HOST, 443)


# Registration makes no network I/O.


class NetworkRecorder:
    """Records every socket connect and getaddrinfo call made while it is installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.connects: list[Any] = []
        self.lookups: list[Any] = []
        real_connect = socket.socket.connect
        real_connect_ex = socket.socket.connect_ex
        real_getaddrinfo = socket.getaddrinfo

        def connect(sock: socket.socket, address: Any) -> None:
            self.connects.append(address)
            real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            self.connects.append(address)
            return real_connect_ex(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            self.lookups.append(host)
            return real_getaddrinfo(host, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize(
    "url", ["http://localhost:1/", "http://169.254.169.254/", "http://[::1]:1/"]
)
async def test_registration_rejects_without_network_io(
    make_settings: SettingsFactory,
    start_gateway_with: GatewayStarter,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
) -> None:
    # Attestation checks are on, as by default: a URL that passed the check would be
    # contacted for its report.
    gateway = await start_gateway_with(
        make_settings(allowed_provider_hosts=(), require_attestation_match=True)
    )
    body = {"pubkey": new_key(), "model": MODEL, "url": url, "signing_algo": "ed25519"}
    async with aiohttp.ClientSession() as http:
        # Connect before recording, so that only the gateway's own I/O is recorded.
        await Admin(http, gateway.admin_url).heartbeat({})
        recorder = NetworkRecorder(monkeypatch)

        answer = await Admin(http, gateway.admin_url).heartbeat(body)

    assert answer.status == 400
    assert answer.json()["error"]["param"] == "url"
    assert recorder.connects == []
    assert recorder.lookups == []


# Listener addresses.


async def test_listeners_bind_loopback_by_default() -> None:
    settings = Settings(port=0, admin_port=0)
    registry = MemoryRegistry()
    running = await start_gateway(settings, registry=registry)
    try:
        public = [address[0] for address in running.public_runner.addresses]
        admin = [address[0] for address in running.admin_runner.addresses]
    finally:
        await running.stop()
        await registry.aclose()

    assert public == ["127.0.0.1"]
    assert admin == ["127.0.0.1"]


# Token comparisons.


@pytest.fixture
def compare_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Record every ``hmac.compare_digest`` call while still comparing for real."""
    calls: list[tuple[bytes, bytes]] = []
    real: Callable[[Any, Any], bool] = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    return calls


TOKENS = TokenStore(
    provider_tokens={"alice": "tok-alice", "bob": "tok-bob", "carol": "tok-carol"},
    admin_token="tok-admin",
)


@pytest.mark.parametrize("token", ["tok-alice", "tok-carol", "tok-mallory", "tok-alic"])
def test_provider_token_compared_with_every_token(
    compare_calls: list[tuple[bytes, bytes]], token: str
) -> None:
    TOKENS.provider_identity(token)

    assert len(compare_calls) == 3
    assert {expected for _, expected in compare_calls} == {
        b"tok-alice",
        b"tok-bob",
        b"tok-carol",
    }


def test_admin_token_compared_in_constant_time(
    compare_calls: list[tuple[bytes, bytes]],
) -> None:
    assert TOKENS.is_admin("tok-admin")
    assert not TOKENS.is_admin("tok-admiN")

    assert compare_calls == [(b"tok-admin", b"tok-admin"), (b"tok-admiN", b"tok-admin")]


@FUZZ_SETTINGS
@given(token=st.text(max_size=40))
def test_provider_token_matches_only_itself(token: str) -> None:
    identity = TOKENS.provider_identity(token)

    expected = {"tok-alice": "alice", "tok-bob": "bob", "tok-carol": "carol"}.get(token)
    assert identity == expected
    assert TOKENS.is_admin(token) == (token == "tok-admin")
