"""Pre-forked workers: ``python -m proxy`` with ``GATEWAY_WORKERS=2`` on a real redis-server.

The process tests start the supervisor as a child process on free 127.0.0.1 ports, with
the session's redis-server and an in-process demo provider, and drive it with the openai
SDK. Per-worker evidence comes from the workers' own metric files (one per process id)
and from /proc. The unit tests at the top need no process.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import openai
import orjson
import pytest
from gateway_harness import (
    MODEL,
    REPO_ROOT,
    Admin,
    DemoStarter,
    GatewayProcess,
    poll_until,
    sample,
    spawn_gateway,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from redis_processes import free_port

from proxy.config import ConfigError, Settings
from proxy.demo.provider import DemoConfig, DemoServer
from proxy.logs import JsonFormatter, WorkerFields
from proxy.metrics import Metrics
from proxy.workers import RestartPolicy, WorkerContext, describe_exit, exit_status

WORKERS = 2
REQUESTS = 40
"""New connections per round: all of them land on one worker with probability 2**-39."""

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
CHAT_OK = {"route": "chat_completions", "status": "200", "outcome": "ok"}
STALE_KEY_BODY = (
    b'{"error":{"message":"The encryption key is no longer valid. Please refresh your '
    b'attestation report and retry.","type":"provider_error","param":null,"code":null}}'
)
PROMPT = "one two"
# The demo provider repeats the prompt's words, one per event.
EXPECTED_TEXT = "one two one two"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# Units: restart policy, exit descriptions, worker log fields, the worker's environment.


def test_restart_policy_doubles_delay_then_gives_up() -> None:
    policy = RestartPolicy(first_delay_s=0.5, budget=3, window_s=60.0)

    delays = [policy.next_delay(now) for now in (0.0, 1.0, 2.0, 3.0)]

    assert delays == [0.5, 1.0, 2.0, None]


def test_restart_policy_forgets_exits_outside_window() -> None:
    policy = RestartPolicy(first_delay_s=0.5, budget=2, window_s=60.0)

    early = [policy.next_delay(0.0), policy.next_delay(1.0)]
    later = policy.next_delay(62.0)

    assert early == [0.5, 1.0]
    assert later == 0.5


@pytest.mark.parametrize(
    ("returncode", "described", "status"),
    [
        (0, "exit code 0", 0),
        (2, "exit code 2", 2),
        (-signal.SIGKILL, "killed by SIGKILL", 137),
        (-signal.SIGTERM, "killed by SIGTERM", 143),
    ],
)
def test_exit_described_and_mapped(returncode: int, described: str, status: int) -> None:
    assert describe_exit(returncode) == described
    assert exit_status(returncode) == status


def test_worker_log_lines_carry_slot_and_pid() -> None:
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(WorkerFields(3))
    logger = logging.getLogger("test.workers.fields")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("hello")
    finally:
        logger.removeHandler(handler)

    entry = orjson.loads(output.getvalue())
    assert entry["message"] == "hello"
    assert entry["worker"] == 3
    assert entry["pid"] == os.getpid()


def test_worker_context_absent_without_index() -> None:
    assert WorkerContext.from_env({"PROMETHEUS_MULTIPROC_DIR": "/tmp/x"}) is None


def test_multiprocess_metrics_need_env_before_import(tmp_path: Path) -> None:
    # This test process imported prometheus_client without PROMETHEUS_MULTIPROC_DIR.
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics(multiprocess_dir=str(tmp_path))


SHARED = {
    "GATEWAY_REGISTRY_URL": "redis://127.0.0.1:6399/0",
    "GATEWAY_PORT": "8080",
    "GATEWAY_ADMIN_PORT": "9090",
}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({**SHARED, "GATEWAY_WORKERS": "0"}, "GATEWAY_WORKERS"),
        ({**SHARED, "GATEWAY_WORKERS": "65"}, "use 1 to 64"),
        ({**SHARED, "GATEWAY_WORKERS": "2", "GATEWAY_REGISTRY_URL": "memory://"}, "memory://"),
        ({**SHARED, "GATEWAY_WORKERS": "2", "GATEWAY_PORT": "0"}, "needs fixed ports"),
        ({**SHARED, "GATEWAY_WORKERS": "2", "GATEWAY_ADMIN_PORT": "0"}, "needs fixed ports"),
    ],
)
def test_workers_setting_rejected(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(env)


def test_workers_setting_accepted() -> None:
    assert Settings.from_env({**SHARED, "GATEWAY_WORKERS": "64"}).workers == 64
    assert Settings.from_env({"GATEWAY_WORKERS": "1", "GATEWAY_PORT": "0"}).workers == 1


# Supervisor processes.


@dataclass
class Supervised:
    """A supervisor child process whose workers share one public and one admin port."""

    gateway: GatewayProcess
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.gateway.log()

    def worker_pids(self) -> set[int]:
        """Return the supervisor's live children, read from /proc."""
        return child_pids(self.gateway.popen.pid)

    def started_pids(self) -> list[int]:
        """Return every worker pid the supervisor logged as started, in order."""
        return [int(pid) for pid in re.findall(r"started worker \d+ \(pid (\d+)\)", self.log())]

    def metrics_dir(self) -> Path:
        found = re.search(r"their metrics are merged in ([^\s\"]+)", self.log())
        assert found is not None, self.log()
        return Path(found[1])


def child_pids(parent: int) -> set[int]:
    """Return the pids of the running (not zombie) children of ``parent``."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces, but the fields after it cannot.
        state, parent_pid = text.rsplit(")", 1)[1].split()[:2]
        if int(parent_pid) == parent and state != "Z":
            children.add(int(stat.parent.name))
    return children


def running(pid: int) -> bool:
    """Return True while ``pid`` is a running gateway process (not a zombie, not reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"proxy" in cmdline and state != "Z"


def requests_by_pid(metrics_dir: Path) -> dict[int, float]:
    """Return the successful chat completions counted in each process's counter file."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
            for s in family.samples
        }
        counts[pid] = sample(samples, "e2ee_gateway_requests_total", **CHAT_OK)
    return counts


async def scrape(url: str) -> tuple[Samples, list[str]]:
    """Read /metrics on a new connection and return the samples and the family names."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    families = list(text_string_to_metric_families(text))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families
        for s in family.samples
    }
    return samples, [family.name for family in families]


def new_connection_sdk(url: str) -> openai.AsyncOpenAI:
    """An SDK client that opens a new connection per request, so the kernel spreads them."""
    http_client = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_keepalive_connections=0))
    return openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http_client
    )


async def stream_text(client: openai.AsyncOpenAI, pubkey: str) -> str:
    """Stream a pinned chat completion and return its content."""
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        extra_headers={"X-Model-Pub-Key": pubkey},
    )
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


async def send_round(url: str, pubkey: str, count: int = REQUESTS) -> list[str]:
    """Send ``count`` pinned streams, eight at a time, each on a new connection."""
    texts: list[str] = []
    async with new_connection_sdk(url) as client:
        for start in range(0, count, 8):
            batch = range(start, min(start + 8, count))
            texts += await asyncio.gather(*(stream_text(client, pubkey) for _ in batch))
    return texts


SupervisorStarter = Callable[..., Awaitable[Supervised]]


@pytest.fixture
async def start_supervisor(
    tmp_path: Path, token_dir: Path, redis_server: Any
) -> AsyncIterator[SupervisorStarter]:
    """Return a starter of 2-worker supervisors. Teardown stops them and leftover workers."""
    started: list[Supervised] = []

    async def start(*, wait_ready: bool = True, **env: str) -> Supervised:
        port, admin_port = free_port(), free_port()
        settings = {
            "GATEWAY_WORKERS": str(WORKERS),
            "GATEWAY_REGISTRY_URL": redis_server.url,
            "GATEWAY_REDIS_PREFIX": f"test-{secrets.token_hex(6)}",
            "GATEWAY_PORT": str(port),
            "GATEWAY_ADMIN_PORT": str(admin_port),
            "GATEWAY_PROVIDER_TOKENS_FILE": str(token_dir / "provider-tokens"),
            "GATEWAY_ADMIN_TOKEN_FILE": str(token_dir / "admin-token"),
            "GATEWAY_ALLOWED_PROVIDER_HOSTS": "127.0.0.1/32",
            "GATEWAY_DRAIN_DELAY_S": "0",
            "GATEWAY_SHUTDOWN_GRACE_S": "5",
            **env,
        }
        log_path = tmp_path / f"supervisor-{len(started)}.log"
        supervised = Supervised(spawn_gateway(settings, log_path), port, admin_port)
        started.append(supervised)
        if wait_ready:
            await wait_all_ready(supervised)
        return supervised

    yield start

    for supervised in started:
        popen = supervised.gateway.popen
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(popen.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)
        for pid in supervised.started_pids():
            if running(pid):
                os.kill(pid, signal.SIGKILL)


async def wait_all_ready(supervised: Supervised) -> None:
    def ready() -> bool:
        assert supervised.gateway.popen.poll() is None, f"exited:\n{supervised.log()}"
        return f"all {WORKERS} workers are ready" in supervised.log()

    try:
        await poll_until(ready, timeout_s=START_TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(f"workers not ready:\n{supervised.log()}") from None


async def register_demo(start_demo: DemoStarter, supervised: Supervised) -> tuple[DemoServer, str]:
    """Start a demo provider, register its ed25519 key, and return it with the key."""
    demo = await start_demo(DemoConfig(model=MODEL, events=4))
    key = demo.config.keys.public_key_hex("ed25519")
    async with aiohttp.ClientSession() as http:
        await Admin(http, supervised.admin_url).register(key, demo.url)
    return demo, key


async def test_workers_spread_requests_and_merge_metrics(
    start_supervisor: SupervisorStarter, start_demo: DemoStarter
) -> None:
    supervised = await start_supervisor()
    demo, key = await register_demo(start_demo, supervised)

    texts = await send_round(supervised.url, key)
    async with new_connection_sdk(supervised.url) as client:
        with pytest.raises(openai.APIStatusError) as stale:
            await stream_text(client, secrets.token_hex(32))
    scrapes = [await scrape(supervised.admin_url) for _ in range(6)]
    workers = supervised.worker_pids()
    by_pid = requests_by_pid(supervised.metrics_dir())

    assert texts == [EXPECTED_TEXT] * REQUESTS
    assert demo.state.requests["/v1/chat/completions"] == REQUESTS
    assert stale.value.status_code == 421
    assert stale.value.response.content == STALE_KEY_BODY
    assert len(workers) == WORKERS
    # Each worker counted its own share in its own file, and both had a share.
    assert set(by_pid) == workers
    assert all(count > 0 for count in by_pid.values()), by_pid
    assert sum(by_pid.values()) == REQUESTS
    # Whichever worker serves the scrape reports the totals of all workers.
    for samples, families in scrapes:
        assert sample(samples, "e2ee_gateway_requests_total", **CHAT_OK) == REQUESTS
        stale_labels = {"route": "chat_completions", "status": "421", "outcome": "stale_pubkey"}
        assert sample(samples, "e2ee_gateway_requests_total", **stale_labels) == 1
        assert sample(samples, "e2ee_gateway_time_to_first_byte_seconds_count") == REQUESTS
        assert sample(samples, "e2ee_gateway_requests_in_flight") == 0
        assert sample(samples, "e2ee_gateway_streams_in_flight") == 0
        assert sample(samples, "e2ee_gateway_draining") == 0
        assert len(families) == len(set(families)), families
        assert "e2ee_gateway_live_keys" in families


async def test_registry_lookups_summed_over_workers(
    start_supervisor: SupervisorStarter, start_demo: DemoStarter
) -> None:
    supervised = await start_supervisor()
    _, key = await register_demo(start_demo, supervised)
    lookups: dict[str, float] = {}

    await send_round(supervised.url, key)

    async def counted() -> bool:
        nonlocal lookups
        samples, _ = await scrape(supervised.admin_url)
        lookups = {
            dict(labels)["source"]: value
            for (name, labels), value in samples.items()
            if name == "e2ee_gateway_registry_lookups_total"
        }
        return sum(lookups.values()) >= REQUESTS

    # Each worker copies its registry counters into its file every second.
    await poll_until(counted, timeout_s=10)
    assert lookups.get("snapshot", 0) > 0, lookups


async def test_killed_worker_is_restarted(
    start_supervisor: SupervisorStarter, start_demo: DemoStarter
) -> None:
    supervised = await start_supervisor()
    _, key = await register_demo(start_demo, supervised)
    before = await send_round(supervised.url, key)
    victim, survivor = sorted(supervised.worker_pids())

    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        new = supervised.worker_pids() - {victim, survivor}
        return any(f"(pid {pid}) is ready" in supervised.log() for pid in new)

    await poll_until(replaced, timeout_s=START_TIMEOUT_S)
    after = await send_round(supervised.url, key)
    samples, _ = await scrape(supervised.admin_url)
    workers = supervised.worker_pids()
    (replacement,) = workers - {survivor}
    by_pid = requests_by_pid(supervised.metrics_dir())
    log = supervised.log()

    assert before == after == [EXPECTED_TEXT] * REQUESTS
    assert survivor in workers
    assert victim not in workers
    assert re.search(
        rf"ERROR proxy\.workers: worker \d \(pid {victim}\) exited unexpectedly "
        r"\(killed by SIGKILL\); restarting it in 0\.5 s",
        log,
    ), log
    assert by_pid[replacement] > 0, by_pid
    # The killed worker's counts stay in the totals.
    assert by_pid[victim] > 0, by_pid
    assert sample(samples, "e2ee_gateway_requests_total", **CHAT_OK) == 2 * REQUESTS
    assert sample(samples, "e2ee_gateway_requests_in_flight") == 0


async def test_sigterm_stops_workers_and_removes_metrics_dir(
    start_supervisor: SupervisorStarter, start_demo: DemoStarter
) -> None:
    supervised = await start_supervisor(GATEWAY_LOG_FORMAT="json")
    _, key = await register_demo(start_demo, supervised)
    await send_round(supervised.url, key, count=4)
    workers = supervised.worker_pids()
    metrics_dir = supervised.metrics_dir()
    assert metrics_dir.is_dir()

    supervised.gateway.send_signal(signal.SIGTERM)
    code = await supervised.gateway.wait_exit(STOP_TIMEOUT_S)
    entries = [orjson.loads(line) for line in supervised.log().splitlines()]
    worker_entries = [entry for entry in entries if "worker" in entry]

    assert code == 0
    assert not metrics_dir.exists()
    assert not any(running(pid) for pid in workers)
    assert {entry["pid"] for entry in worker_entries} == workers
    assert {entry["worker"] for entry in worker_entries} == set(range(WORKERS))
    stopped = [entry for entry in worker_entries if entry["message"] == "stopped"]
    assert len(stopped) == WORKERS
    messages = [entry["message"] for entry in entries]
    assert f"received SIGTERM: forwarding it to {WORKERS} worker(s)" in messages
    assert "all workers stopped; exiting with code 0" in messages


async def test_operator_metrics_dir_emptied_and_kept(
    start_supervisor: SupervisorStarter, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left over from an earlier run")
    (metrics_dir / "README").write_text("not a metrics file", encoding="utf-8")

    supervised = await start_supervisor(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    samples, _ = await scrape(supervised.admin_url)
    supervised.gateway.send_signal(signal.SIGTERM)
    code = await supervised.gateway.wait_exit(STOP_TIMEOUT_S)

    assert code == 0
    assert supervised.metrics_dir() == metrics_dir
    assert not (metrics_dir / "counter_1.db").exists()
    assert (metrics_dir / "README").exists()
    assert sample(samples, "e2ee_gateway_requests_in_flight") == 0


async def test_workers_drain_when_supervisor_killed(
    start_supervisor: SupervisorStarter,
) -> None:
    supervised = await start_supervisor()
    workers = supervised.worker_pids()
    metrics_dir = supervised.metrics_dir()

    supervised.gateway.popen.kill()
    await supervised.gateway.wait_exit(STOP_TIMEOUT_S)

    def all_exited() -> bool:
        return not any(running(pid) for pid in workers)

    await poll_until(all_exited, timeout_s=STOP_TIMEOUT_S)
    log = supervised.log()
    # A supervisor killed by SIGKILL cannot remove its directory.
    shutil.rmtree(metrics_dir)

    assert len(workers) == WORKERS
    assert log.count("the supervisor exited: shutting down gracefully") == WORKERS


async def test_worker_startup_failure_stops_supervisor(
    start_supervisor: SupervisorStarter,
) -> None:
    # A plain listening socket without SO_REUSEPORT: no worker can bind the admin port.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        admin_port = holder.getsockname()[1]
        supervised = await start_supervisor(wait_ready=False, GATEWAY_ADMIN_PORT=str(admin_port))
        code = await supervised.gateway.wait_exit(STOP_TIMEOUT_S)
    log = supervised.log()
    started = supervised.started_pids()

    assert code == 1
    assert "cannot start:" in log
    assert "address already in use" in log
    assert re.search(r"worker \d \(pid \d+\) failed to start \(exit code 1\)", log), log
    assert "restarting" not in log
    assert len(started) == WORKERS
    assert not any(running(pid) for pid in started)


async def test_worker_token_file_error_exits_2(
    start_supervisor: SupervisorStarter, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-tokens-file"

    supervised = await start_supervisor(wait_ready=False, GATEWAY_PROVIDER_TOKENS_FILE=str(missing))
    code = await supervised.gateway.wait_exit(STOP_TIMEOUT_S)
    log = supervised.log()

    assert code == 2
    assert "cannot start: " in log
    assert str(missing) in log
    assert re.search(r"worker \d \(pid \d+\) failed to start \(exit code 2\)", log), log
    assert not any(running(pid) for pid in supervised.started_pids())


def test_workers_with_memory_registry_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--workers", "2"],
        cwd=REPO_ROOT,
        env={**os.environ, "GATEWAY_REGISTRY_URL": "memory://"},
        capture_output=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert b"GATEWAY_WORKERS=2 needs a shared registry" in result.stderr
    assert b"started worker" not in result.stderr
