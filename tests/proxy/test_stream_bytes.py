"""Relayed bytes stay exact: split reads, huge lines, conflicting framing and encodings."""

from __future__ import annotations

import gzip
import hashlib
import tracemalloc

import aiohttp
import orjson
import pytest
from gateway_harness import (
    SSE_HEADERS,
    Admin,
    FakeStarter,
    Reply,
    chat_body,
    chat_events,
    new_key,
    post_chat,
)
from relay_harness import RawProvider, raw_request

from proxy.server import RunningGateway

COMPLETIONS = "/v1/chat/completions"

UNAVAILABLE_BODY = (
    b'{"error":{"message":"The model is currently unavailable. Please try again later.",'
    b'"type":"bad_gateway","param":null,"code":null}}'
)

BIG_LINE_BYTES = 2 * 1024 * 1024


def delta_event(content: str, newline: bytes) -> bytes:
    payload = orjson.dumps({"choices": [{"index": 0, "delta": {"content": content}}]})
    return b"data: " + payload + newline + newline


def split_stream(newline: bytes) -> tuple[bytes, ...]:
    """Return writes that cut UTF-8 characters, a blank line and ``[DONE]`` across reads."""
    multibyte = delta_event("漢字 🙂 café", newline)
    more = delta_event("日本語 🚀 naïve", newline)
    split = delta_event("split", newline)
    return (
        *(multibyte[i : i + 1] for i in range(len(multibyte))),
        *(more[i : i + 1] for i in range(len(more))),
        # The last byte of the blank line on its own: "\n" | "\n", or "\r\n\r" | "\n".
        split[:-1],
        split[-1:],
        b"data: [DO",
        b"NE]" + newline + newline,
    )


async def stream_digest(
    http: aiohttp.ClientSession, gateway: RunningGateway, key: str
) -> tuple[int, str, int, int]:
    """Stream a pinned chat request; return status, SHA-256, size and ``[DONE]`` count."""
    digest = hashlib.sha256()
    size = 0
    done = 0
    tail = b""
    async with http.post(
        gateway.url + COMPLETIONS,
        data=orjson.dumps(chat_body()),
        headers={"X-Model-Pub-Key": key},
    ) as response:
        async for chunk in response.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
            window = tail + chunk
            done += window.count(b"[DONE]") - tail.count(b"[DONE]")
            tail = window[-5:]
    return response.status, digest.hexdigest(), size, done


# Events and UTF-8 split across reads.


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
async def test_split_writes_relayed_byte_exact(
    gateway: RunningGateway,
    admin: Admin,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
    newline: bytes,
) -> None:
    writes = split_stream(newline)
    fake = await start_fake(Reply(chunks=writes, delay_s=0.005))
    key = new_key()
    await admin.register(key, fake.url)

    status, digest, size, done = await stream_digest(http, gateway, key)

    sent = bytes(fake.served[0].sent)
    assert status == 200
    assert size == len(sent)
    assert digest == hashlib.sha256(sent).hexdigest()
    assert done == 1


# One SSE line larger than any read buffer.


@pytest.mark.parametrize("big_first", [False, True], ids=["after-event", "first-event"])
async def test_huge_line_relayed_in_bounded_memory(
    gateway: RunningGateway, admin: Admin, http: aiohttp.ClientSession, big_first: bool
) -> None:
    big = b'data: {"content":"' + b"x" * BIG_LINE_BYTES + b'"}\n\n'
    normal, done = chat_events(1)
    # The raw provider writes 64 KiB at a time and keeps no copy, so what the process
    # allocates beyond that is the gateway's and the client's.
    pieces = tuple(big[i : i + 65536] for i in range(0, len(big), 65536))
    body = (*pieces, normal, done) if big_first else (normal, *pieces, done)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    key = new_key()

    async with RawProvider((head, *body)) as provider:
        await admin.register(key, provider.url)
        tracemalloc.start()
        try:
            status, digest, size, done_count = await stream_digest(http, gateway, key)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    sent = b"".join(body)
    assert status == 200
    assert size == len(sent)
    assert digest == hashlib.sha256(sent).hexdigest()
    assert done_count == 1
    # Socket reads (up to 256 KiB each) queued in the gateway's and the client's
    # readers and writers account for about 0.8 times the line, plus the first event
    # the gateway holds back (at most about 1 MiB). A relay that kept the whole line
    # would need at least one more copy of it.
    assert peak < 1.5 * len(big), peak


# Conflicting framing and encodings from the provider.


def chunked(*chunks: bytes) -> bytes:
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return framed + b"0\r\n\r\n"


# Framing that two parsers could read differently (response splitting): relaying it
# would let a downstream parser pick another body than the gateway did.
AMBIGUOUS_FRAMING = {
    "length-and-chunked": b"Content-Length: 7\r\nTransfer-Encoding: chunked\r\n",
    "two-lengths": b"Content-Length: 7\r\nContent-Length: 9\r\n",
}


@pytest.mark.parametrize("framing", AMBIGUOUS_FRAMING.values(), ids=AMBIGUOUS_FRAMING.keys())
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_ambiguous_framing_never_reaches_client(
    gateway: RunningGateway, admin: Admin, stream: bool, framing: bytes
) -> None:
    content_type = b"text/event-stream" if stream else b"application/json"
    reply = (
        b"HTTP/1.1 200 OK\r\nContent-Type: "
        + content_type
        + b"\r\n"
        + framing
        + b"\r\n"
        + chunked(*chat_events(2))
    )
    key = new_key()
    async with RawProvider(reply) as provider:
        await admin.register(key, provider.url)
        body = orjson.dumps(chat_body(stream=stream))
        answer = await raw_request(
            gateway.url,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"X-Model-Pub-Key: " + key.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        )

    framings = [name for name in ("Content-Length", "Transfer-Encoding") if name in answer.headers]
    assert framings == ["Content-Length"], answer.head
    # The upstream client rejects the response, which counts as a failed attempt.
    assert answer.status == 502, answer.head
    assert answer.body == UNAVAILABLE_BODY
    assert provider.connections == 3


async def test_gzip_body_relayed_compressed(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    document = orjson.dumps({"id": "chatcmpl-1", "choices": [{"message": {"content": "é 🙂"}}]})
    compressed = gzip.compress(document)
    headers = (("Content-Type", "application/json"), ("Content-Encoding", "gzip"))
    fake = await start_fake(Reply(headers=headers, chunks=(compressed,)))
    key = new_key()
    await admin.register(key, fake.url)

    raw = await post_chat(http, gateway, pubkey=key, body=chat_body(stream=False))
    async with aiohttp.ClientSession() as decoding:
        decoded = await post_chat(decoding, gateway, pubkey=key, body=chat_body(stream=False))

    assert raw.status == 200
    assert raw.body == compressed
    assert raw.headers["Content-Encoding"] == "gzip"
    assert raw.headers["Content-Length"] == str(len(compressed))
    assert decoded.status == 200
    assert decoded.body == document


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_response_hop_by_hop_headers_dropped(
    gateway: RunningGateway, admin: Admin, http: aiohttp.ClientSession, stream: bool
) -> None:
    body = b"".join(chat_events(1)) if stream else b'{"id":"chatcmpl-1"}'
    content_type = b"text/event-stream" if stream else b"application/json"
    reply = (
        b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\n"
        b"Connection: keep-alive, X-Internal\r\nX-Internal: secret\r\n"
        b"Keep-Alive: timeout=5, max=100\r\nTrailer: X-Checksum\r\n"
        b"X-Kept: yes\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    key = new_key()
    async with RawProvider(reply) as provider:
        await admin.register(key, provider.url)
        answer = await post_chat(http, gateway, pubkey=key, body=chat_body(stream=stream))

    assert answer.status == 200
    assert answer.body == body
    assert answer.headers["X-Kept"] == "yes"
    assert "X-Internal" not in answer.headers
    assert "Keep-Alive" not in answer.headers
    assert "Trailer" not in answer.headers
    assert "Connection" not in answer.headers


@pytest.mark.parametrize(
    "accept_encoding", ["gzip, br", "identity", "*", "deflate;q=1.0, gzip;q=0.5"]
)
async def test_provider_always_asked_for_identity(
    gateway: RunningGateway,
    admin: Admin,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
    accept_encoding: str,
) -> None:
    fake = await start_fake()
    key = new_key()
    await admin.register(key, fake.url)

    answer = await post_chat(
        http, gateway, pubkey=key, headers=[("Accept-Encoding", accept_encoding)]
    )

    assert answer.status == 200
    assert fake.served[0].headers.getall("Accept-Encoding") == ["identity"]


async def test_stream_not_compressed_for_gzip_client(
    gateway: RunningGateway, admin: Admin, start_fake: FakeStarter, http: aiohttp.ClientSession
) -> None:
    events = tuple(chat_events(5))
    fake = await start_fake(Reply(headers=SSE_HEADERS, chunks=events))
    key = new_key()
    await admin.register(key, fake.url)

    answer = await post_chat(
        http, gateway, pubkey=key, headers=[("Accept-Encoding", "gzip, deflate, br")]
    )

    assert answer.status == 200
    assert "Content-Encoding" not in answer.headers
    assert answer.body == b"".join(events)
