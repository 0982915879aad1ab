"""Inputs the fuzzers found to break the gateway, each kept as a named case."""

from __future__ import annotations

import asyncio
import gzip
import logging

import aiohttp
import orjson
import pytest
from fuzz_harness import assert_clean_logs, assert_envelope, build_request, send_raw
from gateway_harness import (
    MODEL,
    PROVIDER_TOKEN,
    SSE_HEADERS,
    Admin,
    FakeStarter,
    GatewayStarter,
    Reply,
    SettingsFactory,
    new_key,
)

from proxy.server import RunningGateway

COMPLETIONS = b"/v1/chat/completions"


def listener_port(gateway: RunningGateway, listener: str) -> int:
    return gateway.port if listener == "public" else gateway.admin_port


# aiohttp's HTTP parser rejections.


@pytest.mark.parametrize("listener", ["public", "admin"])
async def test_parser_rejection_logged_without_traceback(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture, listener: str
) -> None:
    caplog.set_level(logging.INFO)
    request = build_request(b"GET", b"/healthz", [(b"Authorization", b"Bearer secret-tok\x00")])

    reply = await send_raw(listener_port(gateway, listener), request)

    assert reply.status == 400
    assert_clean_logs(caplog)
    rejections = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(rejections) == 1
    assert "BadHttpMessage" in rejections[0].getMessage()


@pytest.mark.parametrize("listener", ["public", "admin"])
async def test_parser_rejection_log_omits_request_bytes(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture, listener: str
) -> None:
    caplog.set_level(logging.DEBUG)
    request = build_request(b"GET", b"/healthz", [(b"Authorization", b"Bearer secret-tok\x00")])

    await send_raw(listener_port(gateway, listener), request)

    assert "secret-tok" not in caplog.text


# Compressed request bodies.


async def test_gzip_body_never_forwarded_decompressed(
    gateway: RunningGateway,
    admin: Admin,
    start_fake: FakeStarter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = await start_fake(Reply())
    key = new_key()
    await admin.register(key, provider.url)
    body = gzip.compress(orjson.dumps({"model": MODEL, "stream": True}))
    headers = [(b"Content-Encoding", b"gzip"), (b"X-Model-Pub-Key", key.encode())]

    reply = await send_raw(gateway.port, build_request(b"POST", COMPLETIONS, headers, body))

    assert reply.status == 400
    assert assert_envelope(reply)["code"] == "invalid_json"
    assert provider.requests == 0
    assert_clean_logs(caplog)


@pytest.mark.parametrize("listener", ["public", "admin"])
async def test_corrupt_gzip_body_gets_400(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture, listener: str
) -> None:
    path = COMPLETIONS if listener == "public" else b"/v1/providers/heartbeat"
    headers = [
        (b"Content-Encoding", b"gzip"),
        (b"Authorization", b"Bearer " + PROVIDER_TOKEN.encode()),
    ]

    reply = await send_raw(
        listener_port(gateway, listener), build_request(b"POST", path, headers, b"not gzip")
    )

    assert reply.status == 400
    assert assert_envelope(reply)["code"] == "invalid_json"
    assert_clean_logs(caplog)


# Clients that leave while their body is read.


async def test_heartbeat_client_leaving_mid_body_not_error(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _, writer = await asyncio.open_connection("127.0.0.1", gateway.admin_port)
    writer.write(
        b"POST /v1/providers/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + PROVIDER_TOKEN.encode() + b"\r\n"
        b'Content-Length: 100\r\n\r\n{"pubkey":'
    )
    await writer.drain()
    await asyncio.sleep(0.1)

    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.2)

    assert_clean_logs(caplog)
    access = [r for r in caplog.records if r.name == "proxy.access"]
    assert [getattr(r, "outcome", None) for r in access] == ["client_disconnect"]


# Provider answers.


@pytest.mark.parametrize(
    "code",
    ["\u00b2\u00b2\u00b2", "9" * 5000, "\u0665\u0660\u0663"],
    ids=["superscript-digits", "5000-digits", "arabic-indic-digits"],
)
async def test_error_event_with_odd_code_gets_502(
    start_gateway_with: GatewayStarter,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    code: str,
) -> None:
    gateway = await start_gateway_with()
    event = b"data: " + orjson.dumps({"error": {"message": "busy", "code": code}}) + b"\n\n"
    provider = await start_fake(Reply(headers=SSE_HEADERS, chunks=(event,)))
    key = new_key()
    await Admin(http, gateway.admin_url).register(key, provider.url)
    body = orjson.dumps({"model": MODEL, "stream": True})

    reply = await send_raw(
        gateway.port,
        build_request(b"POST", COMPLETIONS, [(b"X-Model-Pub-Key", key.encode())], body),
    )

    assert reply.status == 502
    assert reply.body == event[len(b"data: ") : -2]
    assert_clean_logs(caplog)


# Provider URLs.


@pytest.mark.parametrize("url", ["http://[::1]@", "http://[]@/", "//a[b]c@"])
async def test_heartbeat_url_with_bracket_before_empty_host_gets_400(
    admin: Admin, caplog: pytest.LogCaptureFixture, url: str
) -> None:
    body = {"pubkey": new_key(), "model": MODEL, "url": url, "signing_algo": "ed25519"}

    answer = await admin.heartbeat(body)

    assert answer.status == 400
    assert answer.json()["error"]["param"] == "url"
    assert_clean_logs(caplog)


# Request bodies that stop arriving.


async def test_chunked_body_broken_mid_request_answered(
    start_gateway_with: GatewayStarter, make_settings: SettingsFactory
) -> None:
    """aiohttp 3.14's C parser drops a body whose chunked framing breaks after the first
    chunk without failing the read; the client body timeout answers it."""
    gateway = await start_gateway_with(make_settings(client_body_timeout_s=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\n'
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b'ZZ\r\nel"}\r\n0\r\n\r\n')
        await writer.drain()

        async with asyncio.timeout(3):
            status_line = await reader.readline()
    finally:
        writer.close()

    assert status_line.startswith(b"HTTP/1.1 4")
