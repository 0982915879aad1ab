"""Raw-socket helpers of the relay tests: a provider and a client that control every byte.

aiohttp on either side would normalise framing and headers, so the cases about
conflicting framing, smuggling-prone requests and stale connections use these instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from gateway_harness import WAIT_S
from multidict import CIMultiDict
from yarl import URL

RawAction = bytes | tuple[bytes, ...] | Literal["close", "reset", "hang"]
"""What the raw provider does once it has read a request: write these bytes (a tuple:
one write each, waiting for the socket between writes) and close, close (FIN) or reset
(RST) before any response byte, or send nothing until the gateway closes."""


def _read_content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


class RawProvider:
    """A provider on a bare asyncio server that writes exactly the bytes a test gives it.

    Each connection reads one request (its head and a Content-Length body), records it,
    then takes the next queued action, else ``default``. With ``keep_alive``, a
    connection whose action wrote bytes reads the next request instead of closing. Use
    it as an async context manager: leaving the block closes the listener and every
    connection still open.
    """

    def __init__(
        self, default: RawAction, *, pause_s: float = 0.0, keep_alive: bool = False
    ) -> None:
        self.default = default
        self.pause_s = pause_s
        """Pause between the writes of a tuple action."""
        self.keep_alive = keep_alive
        self.queue: deque[RawAction] = deque()
        self.requests: list[bytes] = []
        """Every request read, head and body, in arrival order."""
        self.connections = 0
        self.closed_by_peer = 0
        """Connections left hanging that the gateway closed."""
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    def then(self, *actions: RawAction) -> None:
        """Queue actions for the next connections, in order."""
        self.queue.extend(actions)

    async def __aenter__(self) -> RawProvider:
        # A backlog above asyncio's 100, so that a burst of connections from the gateway
        # is not delayed by SYN retransmits.
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel("raw provider stopped")
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while await self._serve_one(reader, writer) and self.keep_alive:
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request and act on it; return whether the connection may serve another."""
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readexactly(_read_content_length(head))
        self.requests.append(head + body)
        action = self.queue.popleft() if self.queue else self.default
        if action == "reset":
            sock = writer.get_extra_info("socket")
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if action == "hang":
            # Send nothing, and count the connection once the gateway gives up and closes it.
            await reader.read()
            self.closed_by_peer += 1
            return False
        if action == "close":
            return False
        if isinstance(action, bytes):
            action = (action,)
        for index, part in enumerate(action):
            if index and self.pause_s:
                await asyncio.sleep(self.pause_s)
            writer.write(part)
            await writer.drain()
        return True


@dataclass(frozen=True, slots=True)
class RawResponse:
    """A response read off a raw socket: the head as received and the de-chunked body."""

    status: int
    head: bytes
    headers: CIMultiDict[str]
    body: bytes


async def read_raw_response(reader: asyncio.StreamReader) -> RawResponse:
    """Read one HTTP/1.1 response framed by Content-Length, chunked encoding or EOF.

    Interim 1xx responses (100 Continue) are skipped.
    """
    status = 100
    while 100 <= status < 200:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())

    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        payload = bytes(body)
    elif "Content-Length" in headers:
        payload = await reader.readexactly(int(headers["Content-Length"]))
    else:
        payload = await reader.read()
    return RawResponse(status, head, headers, payload)


async def raw_request(
    url: str, *parts: bytes, pause_s: float = 0.0, timeout_s: float = WAIT_S
) -> RawResponse:
    """Send ``parts`` as they are, ``pause_s`` apart, on a new connection; return the response."""
    target = URL(url)
    assert target.host is not None
    assert target.port is not None
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            for index, part in enumerate(parts):
                if index and pause_s:
                    await asyncio.sleep(pause_s)
                writer.write(part)
                await writer.drain()
            return await read_raw_response(reader)
        finally:
            writer.close()


def logged_faults(records: Iterable[logging.LogRecord]) -> list[str]:
    """Return the records at ERROR or above, or with a traceback, as 'logger: message' lines."""
    return [
        f"{record.name}: {record.getMessage()}"
        for record in records
        if record.levelno >= logging.ERROR or record.exc_info is not None
    ]
