"""Processes and load for the deployment tests: replicas, load balancers, streaming clients.

Everything binds 127.0.0.1. Load balancers run with configs rendered from ``deploy/``
into the test's temporary directory, never with the system's default configuration.
Every process is stopped by its PID when the test ends.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
MODEL = "demo-model"
DONE = b"data: [DONE]\n\n"
START_TIMEOUT_S = 10.0


# Only the braced form with an upper-case name is a placeholder; the other groups, which
# string.Template requires, never match.
_PLACEHOLDER = r"""
\$(?:
    (?P<escaped>(?!))
  | (?P<named>(?!))
  | \{(?P<braced>[A-Z][A-Z0-9_]*)\}
  | (?P<invalid>(?!))
)
"""


class PlaceholderTemplate(string.Template):
    """``${UPPER_CASE}`` placeholders only, so nginx's ``$host`` and the like stay as written."""

    flags = re.RegexFlag(0)
    # string.Template compiles the string when the class is created.
    pattern = _PLACEHOLDER  # type: ignore[assignment]


def placeholders(template: Path) -> set[str]:
    """Return the placeholder names that ``template`` uses."""
    text = template.read_text(encoding="utf-8")
    return {m["braced"] for m in re.finditer(_PLACEHOLDER, text, re.VERBOSE)}


def render(template: Path, destination: Path, values: Mapping[str, str]) -> Path:
    """Write ``template`` with every placeholder replaced; a missing value raises KeyError."""
    text = PlaceholderTemplate(template.read_text(encoding="utf-8")).substitute(values)
    destination.write_text(text, encoding="utf-8")
    return destination


def require_binary(name: str, package: str) -> str:
    """Return the path of ``name``; without it fail when CI=true, else skip."""
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        message = f"{name} is not installed (Debian package {package})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Process:
    """A child process whose stdout and stderr are appended to ``log_path``."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def send_signal(self, signum: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(signum)

    async def wait_exit(self, timeout_s: float) -> int:
        """Return the exit code; raise subprocess.TimeoutExpired after ``timeout_s``."""
        assert self.popen is not None
        return await asyncio.to_thread(self.popen.wait, timeout_s)

    def terminate(self) -> None:
        """Send SIGTERM by PID if the process still runs."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def kill(self, *, terminated: bool = False) -> None:
        """Stop the process by PID: SIGTERM unless ``terminated``, SIGKILL after 5 s."""
        if self.popen is None or self.popen.poll() is not None:
            return
        if not terminated:
            # A second SIGTERM would make a gateway skip its drain.
            self.terminate()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


async def poll_until(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float,
    interval_s: float = 0.05,
) -> None:
    """Call ``check`` until it returns True; raise TimeoutError after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(interval_s)


async def wait_http(
    http: aiohttp.ClientSession,
    url: str,
    process: Process,
    *,
    accept: bytes | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> bytes:
    """Poll ``url`` until it responds with 200 (and ``accept`` in the body, if given)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.running, f"{process.name} exited:\n{process.log()}"
        try:
            async with http.get(url) as response:
                body = await response.read()
                if response.status == 200 and (accept is None or accept in body):
                    return body
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready:\n{process.log()}"
        await asyncio.sleep(0.05)


@dataclass
class Replica:
    """One gateway replica on fixed ports, so that a restart comes back at the same address."""

    process: Process
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Start the process and wait until /readyz and the admin listener respond with 200."""
        self.process.start()
        await wait_http(http, self.url + "/readyz", self.process)
        # The admin listener starts a moment after the public one.
        await wait_http(http, self.admin_url + "/metrics", self.process)

    async def metric(self, http: aiohttp.ClientSession, name: str, **labels: str) -> float:
        """Return one sample of the replica's /metrics, 0 when it was never recorded."""
        async with http.get(self.admin_url + "/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0


def gateway_env(
    *,
    port: int,
    admin_port: int,
    redis_url: str,
    prefix: str,
    secrets_dir: Path,
    **extra: str,
) -> dict[str, str]:
    """Return the environment of one replica: shared Redis registry, short drain timings."""
    return {
        **os.environ,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_ADMIN_HOST": "127.0.0.1",
        "GATEWAY_ADMIN_PORT": str(admin_port),
        "GATEWAY_REGISTRY_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": prefix,
        "GATEWAY_PROVIDER_TOKENS_FILE": str(secrets_dir / "provider-tokens"),
        "GATEWAY_ADMIN_TOKEN_FILE": str(secrets_dir / "admin-token"),
        "GATEWAY_ALLOWED_PROVIDER_HOSTS": "127.0.0.1/32",
        # Longer than HAProxy's check inter (0.2 s) x fall (2), with a margin for the
        # check's own round trip.
        "GATEWAY_DRAIN_DELAY_S": "1.0",
        "GATEWAY_SHUTDOWN_GRACE_S": "10",
        "GATEWAY_FIRST_BYTE_TIMEOUT_S": "10",
        "GATEWAY_IDLE_TIMEOUT_S": "10",
        **extra,
    }


@dataclass
class LoadResult:
    """What a streaming load saw, counted per request."""

    started: int = 0
    completed: int = 0
    failed: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"streams started {self.started}, completed {self.completed}, failed "
            f"{self.failed}, answered 503 {self.statuses[503]}, statuses {dict(self.statuses)}"
        )


async def stream_once(http: aiohttp.ClientSession, url: str, result: LoadResult) -> None:
    """Send one streamed chat completion and count how it ended."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    result.started += 1
    try:
        async with http.post(url + "/v1/chat/completions", data=orjson.dumps(body)) as response:
            data = await response.read()
            status = response.status
    except aiohttp.ClientError as exc:
        result.failed += 1
        result.failures.append(f"{type(exc).__name__}: {exc}")
        return
    result.statuses[status] += 1
    if status == 200 and data.endswith(DONE) and b'"error"' not in data:
        result.completed += 1
    else:
        result.failed += 1
        result.failures.append(f"status {status}: {data[-200:]!r}")


async def run_load(
    http: aiohttp.ClientSession, url: str, clients: int, stop: asyncio.Event
) -> LoadResult:
    """Loop ``clients`` concurrent streaming clients until ``stop`` is set."""
    result = LoadResult()

    async def client() -> None:
        while not stop.is_set():
            await stream_once(http, url, result)

    await asyncio.gather(*(client() for _ in range(clients)))
    return result


@dataclass
class Cluster:
    """A demo provider and its heartbeat agent registered with two gateway replicas."""

    provider: Process
    provider_url: str
    agent: Process
    replicas: list[Replica]
    secrets: dict[str, str]
    directory: Path


ClusterStarter = Callable[..., Awaitable[Cluster]]
LoadBalancerStarter = Callable[[Cluster], Awaitable[tuple[Process, str]]]
