"""Shared parts of the fault tests: resource accounting, stream reading, demo processes.

``FAULTS_SCALE`` (default 1) multiplies the rounds and concurrent requests of every
fault test; ``make faults`` runs them with a larger value.

Resources are read from the test process itself, which runs the gateway: open file
descriptors (``/proc/self/fd``), asyncio tasks, and the gateway's TCP connections to a
provider port (``/proc/net/tcp``: connections whose remote port is the provider's, in
ESTABLISHED or CLOSE_WAIT, the state of a socket the peer closed and we still hold).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from gateway_harness import MODEL

__all__ = [
    "FAULTS_SCALE",
    "STALE_KEY_BODY",
    "UNAVAILABLE_BODY",
    "DemoProcess",
    "StreamResult",
    "Usage",
    "assert_settled",
    "error_code",
    "read_stream",
    "start_demo_process",
    "upstream_connections",
]

FAULTS_SCALE = max(1, int(os.environ.get("FAULTS_SCALE", "1")))

UNAVAILABLE_BODY = (
    b'{"error":{"message":"The model is currently unavailable. Please try again later.",'
    b'"type":"bad_gateway","param":null,"code":null}}'
)
STALE_KEY_BODY = (
    b'{"error":{"message":"The encryption key is no longer valid. Please refresh your '
    b'attestation report and retry.","type":"provider_error","param":null,"code":null}}'
)

_REPO = Path(__file__).resolve().parents[2]
_TCP_STATES = {"01", "08"}  # ESTABLISHED, CLOSE_WAIT


def upstream_connections(ports: Iterable[int]) -> int:
    """Count this host's open TCP connections to 127.0.0.1 on any of ``ports``."""
    wanted = {f"0100007F:{port:04X}" for port in ports}
    count = 0
    with contextlib.suppress(FileNotFoundError), open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[2] in wanted and fields[3] in _TCP_STATES:
                count += 1
    return count


@dataclass(frozen=True, slots=True)
class Usage:
    """Resources held by this process at one moment."""

    fds: int
    tasks: int
    upstream: int

    @classmethod
    def measure(cls, provider_ports: Iterable[int] = ()) -> Usage:
        return cls(
            fds=len(os.listdir("/proc/self/fd")),
            tasks=len(asyncio.all_tasks()),
            upstream=upstream_connections(provider_ports),
        )


async def assert_settled(
    baseline: Usage,
    provider_ports: Iterable[int],
    *,
    fd_margin: int = 4,
    task_margin: int = 0,
    upstream_margin: int = 0,
    timeout_s: float = 5.0,
) -> Usage:
    """Wait until usage is back within the margins over ``baseline``; fail after ``timeout_s``.

    Closing sockets and ending tasks takes a few loop iterations, so the check polls.
    """
    ports = list(provider_ports)
    deadline = time.monotonic() + timeout_s
    while True:
        usage = Usage.measure(ports)
        settled = (
            usage.fds <= baseline.fds + fd_margin
            and usage.tasks <= baseline.tasks + task_margin
            and usage.upstream <= baseline.upstream + upstream_margin
        )
        if settled or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert usage.fds <= baseline.fds + fd_margin, (baseline, usage)
    assert usage.tasks <= baseline.tasks + task_margin, (
        baseline,
        usage,
        sorted(task.get_name() for task in asyncio.all_tasks()),
    )
    assert usage.upstream <= baseline.upstream + upstream_margin, (baseline, usage)
    return usage


@dataclass(frozen=True, slots=True)
class StreamResult:
    """What a client received for one request, read to the end."""

    status: int
    content_type: str
    body: bytes
    events: list[bytes]
    """The SSE events of the body, each without its blank-line terminator."""
    duration_s: float

    @property
    def done(self) -> bool:
        return b"data: [DONE]" in self.events


def error_code(event: bytes) -> object:
    """Return the ``error.code`` of an SSE error event, or None when it is not one."""
    if not event.startswith(b"data: {"):
        return None
    try:
        decoded = orjson.loads(event[len(b"data: ") :])
    except orjson.JSONDecodeError:
        return None  # a partial event the provider cut off
    if not isinstance(decoded, dict) or not isinstance(decoded.get("error"), dict):
        return None
    error = decoded["error"]
    assert list(error) == ["message", "type", "param", "code"], error
    assert error["type"] == "server_error", error
    return error["code"]


async def read_stream(
    http: aiohttp.ClientSession,
    url: str,
    *,
    pubkey: str | None = None,
    stream: bool = True,
    timeout_s: float,
    started: asyncio.Event | None = None,
    min_events: int = 1,
) -> StreamResult:
    """POST a chat completion and read the response to its end within ``timeout_s``.

    ``started`` is set once ``min_events`` events have arrived.
    """
    headers = {} if pubkey is None else {"X-Model-Pub-Key": pubkey}
    body = orjson.dumps({"model": MODEL, "stream": stream, "messages": []})
    begin = time.monotonic()
    async with asyncio.timeout(timeout_s):
        async with http.post(url + "/v1/chat/completions", data=body, headers=headers) as response:
            received = bytearray()
            async for chunk in response.content.iter_any():
                received += chunk
                if started is not None and received.count(b"\n\n") >= min_events:
                    started.set()
    events = [part.strip(b"\r\n") for part in bytes(received).split(b"\n\n")]
    return StreamResult(
        status=response.status,
        content_type=response.content_type,
        body=bytes(received),
        events=[event for event in events if event],
        duration_s=time.monotonic() - begin,
    )


@dataclass
class DemoProcess:
    """A ``python -m proxy.demo`` child process started by one test."""

    process: asyncio.subprocess.Process
    url: str
    pubkey: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        """Send SIGKILL, as a crash or the OOM killer would."""
        if self.process.returncode is None:
            os.kill(self.process.pid, signal.SIGKILL)

    async def wait(self) -> int:
        return await self.process.wait()


_URL_LINE = re.compile(rb"at (http://127\.0\.0\.1:\d+)")
_KEY_LINE = re.compile(rb"ed25519 public key: ([0-9a-f]{64})")


async def start_demo_process(*args: str, timeout_s: float = 15.0) -> DemoProcess:
    """Start a demo provider on a free 127.0.0.1 port offering ed25519; return its URL and key."""
    env = {**os.environ, "PYTHONPATH": str(_REPO)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.demo",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--signing-algo",
        "ed25519",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(timeout_s):
            url_line = await process.stdout.readline()
            key_line = await process.stdout.readline()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    url = _URL_LINE.search(url_line)
    key = _KEY_LINE.search(key_line)
    assert url is not None, url_line
    assert key is not None, key_line
    return DemoProcess(process, url.group(1).decode(), key.group(1).decode())
