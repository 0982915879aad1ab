"""Test doubles and helpers for the gateway tests: a scripted provider, a clock, admin calls.

The fixtures in ``conftest.py`` build these objects, and test modules import the types
from here for their annotations.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Settings
from proxy.demo.provider import DemoConfig, DemoServer
from proxy.server import RunningGateway

PROVIDER_TOKEN = "tok-alice"
OTHER_PROVIDER_TOKEN = "tok-bob"
ADMIN_TOKEN = "tok-admin"
MODEL = "demo-model"
WAIT_S = 5.0

SSE_HEADERS = (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"))


def new_key() -> str:
    """Return a random ed25519-length public key (64 hex characters)."""
    return secrets.token_hex(32)


def closed_port_url() -> str:
    """Return a 127.0.0.1 base URL whose port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sse(payload: dict[str, Any]) -> bytes:
    """Frame a JSON payload as one SSE event."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def chat_events(count: int, *, tag: str = "fake") -> list[bytes]:
    """Return ``count`` deterministic chat chunks followed by ``data: [DONE]``."""
    events = [
        sse(
            {
                "id": f"chatcmpl-{tag}",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": MODEL,
                "choices": [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": None}],
            }
        )
        for i in range(count)
    ]
    return [*events, b"data: [DONE]\n\n"]


def chat_body(*, stream: bool = True, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class FakeClock:
    """Unix clock for the memory registry that moves only when a test moves it."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Reply:
    """What the scripted provider does with one request.

    ``hold`` delays the response headers until the event is set. ``end="reset"`` sends a
    TCP RST after the chunks instead of ending the response.
    """

    status: int = 200
    headers: tuple[tuple[str, str], ...] = SSE_HEADERS
    chunks: tuple[bytes, ...] = tuple(chat_events(3))
    delay_s: float = 0.0
    end: Literal["eof", "reset"] = "eof"
    hold: asyncio.Event | None = None


@dataclass
class Served:
    """One request the scripted provider received and what it wrote back."""

    path: str
    headers: CIMultiDict[str]
    body: bytes
    write_times: list[float] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)
    query: str = ""


class ScriptedProvider:
    """A provider that replies to each request with the next queued Reply, else ``default``.

    It records every request, the bytes it wrote and the monotonic time of each write.
    """

    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply()
        self.queue: deque[Reply] = deque()
        self.served: list[Served] = []
        self.url = ""
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def requests(self) -> int:
        return len(self.served)

    def then(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order."""
        self.queue.extend(replies)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for_requests(self, count: int, timeout_s: float = WAIT_S) -> None:
        """Return once ``count`` requests have arrived in total."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self.requests >= count)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        reply = self.queue.popleft() if self.queue else self.default
        served = Served(
            request.path,
            CIMultiDict(request.headers),
            await request.read(),
            query=request.query_string,
        )
        self.served.append(served)
        async with self._changed:
            self._changed.notify_all()

        if reply.hold is not None:
            await reply.hold.wait()
        return await self._respond(request, reply, served)

    async def _respond(
        self, request: web.Request, reply: Reply, served: Served
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=reply.status, headers=CIMultiDict(reply.headers))
        await response.prepare(request)
        for index, chunk in enumerate(reply.chunks):
            if index and reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            await response.write(chunk)
            served.write_times.append(time.monotonic())
            served.sent += chunk

        if reply.end == "reset":
            # Give the gateway time to read what was written: an RST discards unsent data.
            await asyncio.sleep(0.05)
            _reset(request)
            return response
        await response.write_eof()
        return response


def _reset(request: web.Request) -> None:
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass(frozen=True, slots=True)
class Fetched:
    """A response whose body has been read in full."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def fetch(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Fetched:
    """Send one request and return its status, headers and whole body."""
    async with http.request(method, url, **kwargs) as response:
        return Fetched(response.status, response.headers, await response.read())


@dataclass
class Admin:
    """Calls to the admin listener of one gateway, as a provider or an operator makes them."""

    http: aiohttp.ClientSession
    url: str

    async def heartbeat(
        self,
        body: dict[str, Any] | bytes,
        *,
        token: str | None = PROVIDER_TOKEN,
    ) -> Fetched:
        """Send one heartbeat and return the response."""
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        return await fetch(
            self.http, "POST", self.url + "/v1/providers/heartbeat", data=data, headers=headers
        )

    async def register(
        self,
        pubkey: str,
        url: str,
        *,
        model: str = MODEL,
        signing_algo: str = "ed25519",
        ttl_s: float | None = None,
        token: str = PROVIDER_TOKEN,
    ) -> dict[str, Any]:
        """Register an endpoint and return the decoded response; fail the test unless 200."""
        body: dict[str, Any] = {
            "pubkey": pubkey, "model": model, "url": url, "signing_algo": signing_algo,
        }
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        answer = await self.heartbeat(body, token=token)
        assert answer.status == 200, answer.body
        decoded: dict[str, Any] = answer.json()
        return decoded

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Return every sample of ``/metrics`` keyed by (name, sorted labels)."""
        async with self.http.get(self.url + "/metrics") as response:
            text = await response.text()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def sample(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    **labels: str,
) -> float:
    """Return one metric sample's value, 0 when it was never recorded."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def post_chat(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    *,
    pubkey: str | None = None,
    body: dict[str, Any] | bytes | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> Fetched:
    """POST a chat completion to the gateway and return the whole response."""
    all_headers = CIMultiDict(headers)
    if pubkey is not None:
        all_headers["X-Model-Pub-Key"] = pubkey
    if body is None:
        body = chat_body()
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return await fetch(
        http, "POST", gateway.url + "/v1/chat/completions", data=data, headers=all_headers
    )


class SettingsFactory(Protocol):
    def __call__(self, **overrides: Any) -> Settings: ...


class GatewayStarter(Protocol):
    async def __call__(self, settings: Settings | None = None) -> RunningGateway: ...


class DemoStarter(Protocol):
    async def __call__(self, config: DemoConfig | None = None) -> DemoServer: ...


class FakeStarter(Protocol):
    async def __call__(self, default: Reply | None = None) -> ScriptedProvider: ...


# Gateway child processes (``python -m proxy``), for tests of signals and of whole runs.

REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"listening: public [0-9.]+:(\d+), admin [0-9.]+:(\d+)")


@dataclass
class GatewayProcess:
    """A gateway child process on 127.0.0.1 whose stdout and stderr go to ``log_path``."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    admin_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    async def wait_exit(self, timeout_s: float) -> int:
        """Return the exit code; raise subprocess.TimeoutExpired after ``timeout_s``."""
        return await asyncio.to_thread(self.popen.wait, timeout_s)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def spawn_gateway(env: dict[str, str], log_path: Path) -> GatewayProcess:
    """Start ``python -m proxy`` with ``GATEWAY_*`` values on free 127.0.0.1 ports."""
    full_env = {
        **os.environ,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_ADMIN_HOST": "127.0.0.1",
        "GATEWAY_PORT": "0",
        "GATEWAY_ADMIN_PORT": "0",
        **env,
    }
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "proxy"],
            env=full_env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return GatewayProcess(popen, log_path)


async def wait_listening(process: GatewayProcess, timeout_s: float = 10.0) -> None:
    """Wait for the process's "listening" log line and take both ports from it."""

    def listening() -> bool:
        assert process.popen.poll() is None, f"gateway exited:\n{process.log()}"
        return _LISTENING.search(process.log()) is not None

    try:
        await poll_until(listening, timeout_s=timeout_s)
    except TimeoutError:
        raise AssertionError(f"gateway not listening:\n{process.log()}") from None
    found = _LISTENING.search(process.log())
    assert found is not None
    process.port, process.admin_port = int(found[1]), int(found[2])


async def poll_until(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float = WAIT_S,
    interval_s: float = 0.02,
) -> None:
    """Call ``check`` until it returns True; raise TimeoutError after ``timeout_s``.

    For state that no event announces, such as another process's listener or metrics.
    """
    async with asyncio.timeout(timeout_s):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(interval_s)
