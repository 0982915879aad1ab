"""Test helpers: private redis-server processes and a slow TCP relay.

Every process listens on 127.0.0.1 only, keeps nothing on disk, and is stopped by PID
(after SIGCONT, in case a test froze it) when its test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def resp_command(port: int, *args: str, timeout_s: float = 1.0) -> bytes:
    """Send one RESP command on a fresh connection and return the first reply bytes."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        return sock.recv(65536)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; CI must install it (see .ci/run)")
        pytest.skip(f"{name} is not installed")
    return path


@dataclass
class RedisProcess:
    """A redis-server (or redis-sentinel) process owned by one test."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    frozen: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def freeze(self) -> None:
        """Stop the process with SIGSTOP: connections stay open and nothing replies."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash would."""
        if self.frozen:
            self.thaw()
        self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        if self.frozen:
            self.thaw()
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)


def _wait_until_answering(server: RedisProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        with contextlib.suppress(OSError):
            if resp_command(server.port, "PING").startswith(b"+PONG"):
                return
        time.sleep(0.02)
    server.stop()
    pytest.fail(f"redis on port {server.port} did not answer PING; see {server.log_path}")


def start_redis(
    data_dir: Path, *, port: int | None = None, args: tuple[str, ...] = ()
) -> RedisProcess:
    """Start a redis-server on 127.0.0.1 (a free port unless given) and wait for PING."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port if port is not None else free_port()
    log_path = data_dir / f"redis-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                _binary("redis-server"),
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
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = RedisProcess(port, process, log_path)
    _wait_until_answering(server)
    return server


def start_sentinel(data_dir: Path, *, master_port: int, service: str) -> RedisProcess:
    """Start one redis-sentinel that monitors the master on 127.0.0.1 with quorum 1."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = data_dir / f"sentinel-{port}.conf"
    # Sentinel rewrites its configuration file, so it lives in the test's directory.
    config.write_text(
        f"port {port}\n"
        "bind 127.0.0.1\n"
        f"dir {data_dir}\n"
        f"sentinel monitor {service} 127.0.0.1 {master_port} 1\n"
        f"sentinel down-after-milliseconds {service} 400\n"
        f"sentinel failover-timeout {service} 2000\n"
        f"sentinel parallel-syncs {service} 1\n",
        encoding="utf-8",
    )
    log_path = data_dir / f"sentinel-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [_binary("redis-sentinel"), str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = RedisProcess(port, process, log_path)
    _wait_until_answering(server)
    return server


@contextlib.contextmanager
def redis_processes() -> Iterator[list[RedisProcess]]:
    """Yield a list to which a test appends its processes; stop them all at the end."""
    started: list[RedisProcess] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


class SlowRelay:
    """TCP relay on 127.0.0.1 that delays every chunk by ``delay_s`` in both directions."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self._target_port = target_port
        self._delay_s = delay_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel("relay closing")
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self._target_port
            )
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink), name="slow-relay-pump")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(65536):
                await asyncio.sleep(self._delay_s)
                sink.write(chunk)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()


def write_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key; return both paths.

    The certificate is its own CA: a client that trusts it verifies the server.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "redis.crt"
    key_path = directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
