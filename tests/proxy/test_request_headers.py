"""Request headers: hop-by-hop ones stop at the gateway, smuggling-prone requests never pass."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re

import aiohttp
import orjson
import pytest
from gateway_harness import (
    Admin,
    FakeStarter,
    GatewayStarter,
    Reply,
    ScriptedProvider,
    SettingsFactory,
    chat_body,
    closed_port_url,
    new_key,
    post_chat,
)
from relay_harness import RawProvider, logged_faults, raw_request

from proxy.server import RunningGateway

BODY = orjson.dumps(chat_body())
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_head(key: str, *lines: bytes) -> bytes:
    """Return the head of a pinned chat request with extra header lines (no blank line)."""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"X-Model-Pub-Key: " + key.encode() + b"\r\n"
        b"Content-Type: application/json\r\n" + b"".join(line + b"\r\n" for line in lines)
    )


async def send_hop_by_hop_request(gateway: RunningGateway, key: str) -> int:
    """Send a request full of hop-by-hop and nominated headers; return the status."""
    head = request_head(
        key,
        b"Host: evil.example",
        b"Connection: close, X-Secret-Hop",
        b"X-Secret-Hop: 1",
        b"Keep-Alive: timeout=5",
        b"TE: trailers",
        b"Upgrade: websocket",
        b"Proxy-Authorization: Basic dXNlcjpwYXNz",
        b"Proxy-Connection: keep-alive",
        b"X-Forwarded-For: 192.0.2.1",
        b"X-Kept: yes",
        b"Content-Length: %d" % len(BODY),
    )
    answer = await raw_request(gateway.url, head + b"\r\n" + BODY)
    return answer.status


async def registered_fake(admin: Admin, start_fake: FakeStarter) -> tuple[ScriptedProvider, str]:
    fake = await start_fake()
    key = new_key()
    await admin.register(key, fake.url)
    return fake, key


# Hop-by-hop and nominated headers.


async def test_hop_by_hop_request_headers_not_forwarded(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter
) -> None:
    fake, key = await registered_fake(admin, start_fake)

    status = await send_hop_by_hop_request(gateway, key)

    received = fake.served[0].headers
    assert status == 200
    for name in (
        "Connection",
        "X-Secret-Hop",
        "Keep-Alive",
        "TE",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Connection",
        "X-Model-Pub-Key",
    ):
        assert name not in received, name
    assert received["X-Kept"] == "yes"
    assert received["Host"] == fake.url.removeprefix("http://")
    assert received["X-Forwarded-Proto"] == "http"


async def test_forwarded_for_replaced_for_untrusted_peer(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter
) -> None:
    fake, key = await registered_fake(admin, start_fake)

    await send_hop_by_hop_request(gateway, key)

    assert fake.served[0].headers.getall("X-Forwarded-For") == ["127.0.0.1"]


async def test_forwarded_for_appended_for_trusted_peer(
    start_gateway_with: GatewayStarter,
    make_settings: SettingsFactory,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_gateway_with(
        make_settings(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
    )
    fake, key = await registered_fake(Admin(http, gateway.admin_url), start_fake)

    await send_hop_by_hop_request(gateway, key)

    assert fake.served[0].headers.getall("X-Forwarded-For") == ["192.0.2.1, 127.0.0.1"]


async def test_expect_continue_answered_not_forwarded(
    gateway: RunningGateway, admin: Admin
) -> None:
    # curl sends this expectation with large bodies; this provider, like some real
    # ones, never sends 100 Continue and just waits for the body.
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    key = new_key()
    async with RawProvider(reply) as provider:
        await admin.register(key, provider.url)
        head = request_head(
            key, b"Host: gw", b"Expect: 100-continue", b"Content-Length: %d" % len(BODY)
        )
        answer = await raw_request(gateway.url, head + b"\r\n", BODY, pause_s=0.05, timeout_s=2.0)

    forwarded_head = provider.requests[0].partition(b"\r\n\r\n")[0].lower()
    assert answer.status == 200
    assert answer.body == b"{}"
    assert b"\r\nexpect:" not in forwarded_head
    assert provider.requests[0].endswith(BODY)


# Requests that aiohttp's parser rejects before any handler runs.

MALFORMED = {
    "length-and-chunked": (
        b"Content-Length: 4",
        b"Transfer-Encoding: chunked",
    ),
    "chunked-and-length": (
        b"Transfer-Encoding: chunked",
        b"Content-Length: 4",
    ),
    "two-lengths": (b"Content-Length: 4", b"Content-Length: 5"),
    "chunked-not-last": (b"Transfer-Encoding: chunked, identity",),
    "length-not-a-number": (b"Content-Length: 4e0",),
    "space-in-name": (b"X Bad: 1", b"Content-Length: 4"),
    "space-before-colon": (b"Content-Length : 4",),
    "no-colon": (b"NoColonHere", b"Content-Length: 4"),
    "folded-line": (b"X-Folded: a", b" b", b"Content-Length: 4"),
    "nul-in-value": (b"X-Nul: a\x00b", b"Content-Length: 4"),
}


@pytest.mark.parametrize("lines", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_rejected_before_routing(
    gateway: RunningGateway,
    admin: Admin,
    start_fake: FakeStarter,
    lines: tuple[bytes, ...],
) -> None:
    fake, key = await registered_fake(admin, start_fake)

    answer = await raw_request(
        gateway.url, request_head(key, b"Host: gw", *lines) + b"\r\n4\r\n{}{}\r\n0\r\n\r\n"
    )

    assert 400 <= answer.status < 500
    assert fake.requests == 0


@pytest.mark.parametrize("lines", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_logs_no_traceback(
    gateway: RunningGateway,
    caplog: pytest.LogCaptureFixture,
    lines: tuple[bytes, ...],
) -> None:
    caplog.set_level(logging.INFO)

    await raw_request(
        gateway.url, request_head(new_key(), b"Host: gw", *lines) + b"\r\n4\r\n{}{}\r\n0\r\n\r\n"
    )

    assert logged_faults(caplog.records) == []


# X-Request-Id on every response.


@pytest.fixture
async def small_gateway(
    start_gateway_with: GatewayStarter, make_settings: SettingsFactory
) -> RunningGateway:
    """A gateway with a 4 KiB body limit and a 0.3 s first-byte timeout."""
    return await start_gateway_with(make_settings(max_body_bytes=4096, first_byte_timeout_s=0.3))


async def answer_with_status(
    status: int,
    gateway: RunningGateway,
    http: aiohttp.ClientSession,
    start_fake: FakeStarter,
    request_id: str,
) -> tuple[int, str, ScriptedProvider | None]:
    """Make the gateway respond with ``status``; return it, the echoed id and the provider."""
    admin = Admin(http, gateway.admin_url)
    fake: ScriptedProvider | None = None
    body = chat_body()
    key = new_key()
    if status in (200, 504):
        fake = await start_fake(Reply(hold=asyncio.Event()) if status == 504 else None)
        await admin.register(key, fake.url)
    elif status == 502:
        await admin.register(key, closed_port_url())
    elif status == 413:
        body = {**chat_body(), "padding": "x" * 8192}
    answer = await post_chat(
        http, gateway, pubkey=key, body=body, headers=[("X-Request-Id", request_id)]
    )
    return answer.status, answer.headers["X-Request-Id"], fake


@pytest.mark.parametrize("status", [200, 421, 502, 413, 504])
async def test_request_id_kept_when_well_formed(
    small_gateway: RunningGateway,
    http: aiohttp.ClientSession,
    start_fake: FakeStarter,
    status: int,
) -> None:
    answered, echoed, fake = await answer_with_status(
        status, small_gateway, http, start_fake, "client-1.a:b_c"
    )

    assert answered == status
    assert echoed == "client-1.a:b_c"
    if fake is not None:
        assert fake.served[0].headers.getall("X-Request-Id") == ["client-1.a:b_c"]


@pytest.mark.parametrize("status", [200, 421, 502, 413, 504])
async def test_request_id_minted_when_malformed(
    small_gateway: RunningGateway,
    http: aiohttp.ClientSession,
    start_fake: FakeStarter,
    status: int,
) -> None:
    answered, echoed, fake = await answer_with_status(
        status, small_gateway, http, start_fake, "not valid!" + "x" * 200
    )

    assert answered == status
    assert REQUEST_ID.fullmatch(echoed)
    assert "not valid" not in echoed
    if fake is not None:
        assert fake.served[0].headers.getall("X-Request-Id") == [echoed]


async def test_request_id_too_long_minted(
    small_gateway: RunningGateway, http: aiohttp.ClientSession, start_fake: FakeStarter
) -> None:
    _, echoed, fake = await answer_with_status(200, small_gateway, http, start_fake, "a" * 129)

    assert echoed != "a" * 129
    assert fake is not None
    assert fake.served[0].headers["X-Request-Id"] == echoed
