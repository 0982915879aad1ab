"""Shared parts of the fuzz tests: hypothesis settings, a raw HTTP client and the invariants.

Requests go over bare sockets so that the fuzzer controls every byte, including bytes
an HTTP client library would refuse to send (CR, LF, NUL, non-UTF-8 header values).

``FUZZ_EXAMPLES`` scales every fuzz test: it is the number of examples per test
(default 100, which keeps the fuzz files within about 10 s). Without it, runs are
derandomized, so CI repeats the same examples; with it, each run draws new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from dataclasses import dataclass

import orjson
import pytest
from hypothesis import HealthCheck, event, settings
from multidict import CIMultiDict

__all__ = [
    "FUZZ_EXAMPLES",
    "FUZZ_SETTINGS",
    "RawReply",
    "assert_clean_logs",
    "assert_envelope",
    "assert_healthy",
    "build_request",
    "check_reply",
    "send_raw",
]

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))

FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize="FUZZ_EXAMPLES" not in os.environ,
    database=None,
    # One gateway serves every example of a test: that it keeps working across them is
    # part of what is tested.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ANSWER_WAIT_S = 2.0
"""How long a complete request may take to get its response on loopback."""

EOF_WAIT_S = 2.0
"""After the client half-closes, how long the server may take to respond or close."""

_MAX_REPLY_BYTES = 4 * 1024 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass(frozen=True, slots=True)
class RawReply:
    """The first response read off a raw connection, or ``status=None`` when it closed first."""

    status: int | None
    headers: CIMultiDict[str]
    body: bytes
    waited_for_eof: bool
    """Whether the server responded only after the client half-closed its side."""

    def json(self) -> object:
        return orjson.loads(self.body)


def build_request(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    content_length: bool = True,
) -> bytes:
    """Return an HTTP/1.1 request with ``Connection: close`` and, by default, a Content-Length."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if content_length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def send_raw(
    port: int, data: bytes, *, head_request: bool = False, answer_wait_s: float = ANSWER_WAIT_S
) -> RawReply:
    """Send ``data`` to 127.0.0.1:``port`` and return the first response.

    Waits ``answer_wait_s`` for a response, then half-closes the connection (a server
    may rightly wait for body bytes the request announced) and waits ``EOF_WAIT_S``
    more. Fails the test when the server neither responds nor closes by then: a hang.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
        reply = await _read_reply(reader, head_request, answer_wait_s)
        if reply is not None:
            return reply
        with contextlib.suppress(OSError):
            writer.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
        reply = await _read_reply(reader, head_request, EOF_WAIT_S, waited_for_eof=True)
        if reply is None:
            pytest.fail(f"no response and no close within {answer_wait_s + EOF_WAIT_S} s")
        return reply
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _read_reply(
    reader: asyncio.StreamReader,
    head_request: bool,
    wait_s: float,
    *,
    waited_for_eof: bool = False,
) -> RawReply | None:
    """Read one response within ``wait_s``; None on timeout, status None on a close."""
    try:
        async with asyncio.timeout(wait_s):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return RawReply(None, CIMultiDict(), b"", waited_for_eof)
            status, headers = _parse_head(head)
            body = b"" if head_request else await _read_body(reader, headers)
            return RawReply(status, headers, body, waited_for_eof)
    except TimeoutError:
        return None


def _parse_head(head: bytes) -> tuple[int, CIMultiDict[str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ", 2)
    assert version in ("HTTP/1.0", "HTTP/1.1"), lines[0]
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            assert sep, f"response header line without a colon: {line!r}"
            headers.add(name.strip(), value.strip())
    return int(status), headers


async def _read_body(reader: asyncio.StreamReader, headers: CIMultiDict[str]) -> bytes:
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = bytearray()
        while len(body) < _MAX_REPLY_BYTES:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return bytes(body)
    if "Content-Length" in headers:
        return await reader.readexactly(int(headers["Content-Length"]))
    return await reader.read(_MAX_REPLY_BYTES)


def assert_envelope(reply: RawReply) -> dict[str, object]:
    """Check an application error response against the OpenAI envelope; return ``error``."""
    assert reply.headers.get("Content-Type", "").startswith("application/json"), reply
    decoded = reply.json()
    assert isinstance(decoded, dict), reply.body
    assert list(decoded) == ["error"], reply.body
    error = decoded["error"]
    assert isinstance(error, dict), reply.body
    assert list(error) == ["message", "type", "param", "code"], reply.body
    assert isinstance(error["message"], str), reply.body
    assert error["message"], reply.body
    assert isinstance(error["type"], str), reply.body
    assert error["param"] is None or isinstance(error["param"], str), reply.body
    assert error["code"] is None or isinstance(error["code"], str), reply.body
    return error


def check_reply(
    reply: RawReply,
    *,
    allowed: set[int],
    sent_request_id: bytes | None = None,
    head_request: bool = False,
) -> None:
    """Check a response to a complete request: status, envelope on errors, request id.

    A response without ``X-Request-Id`` comes from aiohttp's HTTP parser, which
    rejected the request before the application saw it: it must be a 400.
    """
    assert reply.status is not None, "the gateway closed the connection without a response"
    event(f"status {reply.status}")
    request_id = reply.headers.get("X-Request-Id")
    if request_id is None:
        assert reply.status == 400, reply
        assert reply.headers.get("Content-Type", "").startswith("text/plain"), reply
        return

    assert reply.status in allowed, reply
    if reply.status >= 400 and head_request:
        assert reply.headers.get("Content-Type") == "application/json", reply
    elif reply.status >= 400:
        assert_envelope(reply)
    assert _REQUEST_ID.fullmatch(request_id), request_id
    if sent_request_id is not None and _REQUEST_ID.fullmatch(sent_request_id.decode("latin-1")):
        assert request_id == sent_request_id.decode("latin-1")


async def assert_healthy(port: int) -> None:
    """Check that the listener on ``port`` still serves ``GET /healthz``."""
    reply = await send_raw(port, build_request(b"GET", b"/healthz", [], content_length=False))
    assert reply.status == 200, reply
    assert reply.json() == {"status": "ok"}


def assert_clean_logs(caplog: pytest.LogCaptureFixture, *, allowed: tuple[str, ...] = ()) -> None:
    """Fail on any captured record with a traceback or at ERROR, except ``allowed`` messages.

    ``allowed`` contains message prefixes of ERROR lines that the contract requires.
    """
    faults = [
        f"{record.name} {record.levelname}: {record.getMessage()}"
        for record in caplog.records
        if record.exc_info is not None
        or (record.levelno >= logging.ERROR and not record.getMessage().startswith(allowed))
    ]
    assert faults == []
