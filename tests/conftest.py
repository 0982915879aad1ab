"""Shared fixtures: a private redis-server for the whole session.

The server is this session's own: it binds 127.0.0.1 on a free port, keeps no data on
disk and is stopped by PID at the end. Tests that use it get a flushed database
through ``redis_url``, so they may use the default ``e2ee`` prefix.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REDIS_START_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class RedisServer:
    """A redis-server process started by the test session."""

    port: int
    pid: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_command(port: int, *args: str, timeout_s: float = 1.0) -> bytes:
    """Send one RESP command over a fresh socket and return the raw reply line."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        return sock.recv(4096)


def _wait_for_ping(port: int, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if redis_command(port, "PING").startswith(b"+PONG"):
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(REDIS_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(REDIS_STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Start a redis-server on a free 127.0.0.1 port for the session and stop it after.

    Without the binary the test fails when CI=true and is skipped elsewhere.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (Debian package redis-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)

    data_dir = tmp_path_factory.mktemp("redis")
    log_path = data_dir / "redis.log"
    # A port found free can be taken before redis-server binds it: try a few.
    for _ in range(3):
        port = free_port()
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(data_dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if _wait_for_ping(port, process):
            break
        _stop(process)
    else:
        pytest.fail(f"redis-server did not reply to PING; see {log_path}")

    try:
        yield RedisServer(port=port, pid=process.pid, log_path=log_path)
    finally:
        _stop(process)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """Return the session server's URL after emptying its database for this test."""
    reply = redis_command(redis_server.port, "FLUSHDB")
    assert reply.startswith(b"+OK"), reply
    return redis_server.url
