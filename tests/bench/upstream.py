"""A fake provider for the benchmark: a raw asyncio HTTP/1.1 server that costs little CPU.

The query string chooses the answer, so that the same URL works directly, through nginx
and through the gateway (both pass the query on):

- ``kind=json`` (the default): a small chat completion with Content-Length.
- ``kind=sse&events=N&delay_ms=D``: N chat chunk events and ``data: [DONE]``, chunked.
  The first event goes out with the headers; each later one D ms after the previous one.
  With D = 0 every event is still its own ``write()``, as a provider writes tokens.

``GET /v1/attestation/report`` returns a report that lists ``--pubkey``, so that the
gateway accepts the heartbeat that registers this server. Request bodies must have a
Content-Length (wrk, nginx and aiohttp send one); a chunked request is answered with 501.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from typing import cast
from urllib.parse import parse_qsl

import orjson

MAX_HEAD_BYTES = 64 * 1024
MODEL = "bench-model"

_JSON_BODY = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A short answer from the bench."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
    }
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"


def _response(status: str, content_type: str, body: bytes, *, close: bool = False) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n".encode()
        + connection
        + b"\r\n"
        + body
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(index: int) -> bytes:
    payload = orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": MODEL,
            "choices": [
                {"index": 0, "delta": {"content": f"tok{index:05d}"}, "finish_reason": None}
            ],
        }
    )
    return _chunk(b"data: " + payload + b"\n\n")


class Responses:
    """Prebuilt response bytes, so that serving a request formats nothing."""

    def __init__(self, pubkey: str) -> None:
        self.json = _response("200 OK", "application/json", _JSON_BODY)
        report = {"signing_public_key": pubkey, "signing_algo": "ed25519", "model": MODEL}
        self.report = _response("200 OK", "application/json", orjson.dumps(report))
        self.health = _response("200 OK", "application/json", b'{"status":"ok"}')
        self.not_found = _response("404 Not Found", "application/json", b'{"error":"not found"}')
        self.chunked_request = _response(
            "501 Not Implemented", "text/plain", b"chunked request bodies", close=True
        )
        self.bad_request = _response("400 Bad Request", "text/plain", b"bad request", close=True)
        self.done = _chunk(b"data: [DONE]\n\n") + _LAST_CHUNK
        self._events: list[bytes] = []

    def events(self, count: int) -> list[bytes]:
        while len(self._events) < count:
            self._events.append(_event(len(self._events)))
        return self._events[:count]


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parses requests in turn and answers them."""

    def __init__(self, responses: Responses) -> None:
        self._responses = responses
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._streaming = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._streaming:
            self._serve_buffered()

    def _serve_buffered(self) -> None:
        # Requests are answered in order; a delayed stream resumes this loop when it ends.
        while not self._streaming and self._transport is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    self._close_with(self._responses.bad_request)
                return
            head = bytes(self._buffer[:end]).lower()
            if b"\r\ntransfer-encoding:" in head:
                self._close_with(self._responses.chunked_request)
                return
            length = _content_length(head)
            if length is None:
                self._close_with(self._responses.bad_request)
                return
            if len(self._buffer) < end + 4 + length:
                return
            del self._buffer[: end + 4 + length]
            self._answer(head)

    def _answer(self, head: bytes) -> None:
        transport = self._transport
        assert transport is not None
        target = head[: head.find(b"\r\n")].split(b" ")[1].decode("latin-1")
        path, _, query = target.partition("?")
        if path == "/v1/attestation/report":
            transport.write(self._responses.report)
            return
        if path == "/health":
            transport.write(self._responses.health)
            return
        if not path.startswith("/v1/"):
            transport.write(self._responses.not_found)
            return

        params = dict(parse_qsl(query))
        if params.get("kind", "json") != "sse":
            transport.write(self._responses.json)
            return
        events = self._responses.events(int(params.get("events", "8")))
        delay_s = int(params.get("delay_ms", "0")) / 1000
        transport.write(_SSE_HEAD)
        if delay_s <= 0:
            for event in events:
                transport.write(event)
            transport.write(self._responses.done)
            return
        self._streaming = True
        self._send_delayed(events, 0, delay_s)

    def _send_delayed(self, events: list[bytes], index: int, delay_s: float) -> None:
        transport = self._transport
        if transport is None:
            return
        if index < len(events):
            transport.write(events[index])
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(delay_s, self._send_delayed, events, index + 1, delay_s)
            return
        transport.write(self._responses.done)
        self._timer = None
        self._streaming = False
        self._serve_buffered()

    def _close_with(self, response: bytes) -> None:
        if self._transport is not None:
            self._transport.write(response)
            self._transport.close()


def _content_length(head: bytes) -> int | None:
    """Return the Content-Length of a lowercased request head: 0 when absent, None if invalid."""
    marker = b"\r\ncontent-length:"
    start = head.find(marker)
    if start < 0:
        return 0
    start += len(marker)
    end = head.find(b"\r\n", start)
    value = head[start:] if end < 0 else head[start:end]
    try:
        length = int(value.strip())
    except ValueError:
        return None
    return length if length >= 0 else None


async def serve(host: str, port: int, pubkey: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    responses = Responses(pubkey)
    server = await loop.create_server(
        lambda: UpstreamProtocol(responses), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the benchmark's fake provider.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--pubkey", required=True, help="key listed in the attestation report")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.pubkey))
    else:
        uvloop.run(serve(args.host, args.port, args.pubkey))


if __name__ == "__main__":
    main()
