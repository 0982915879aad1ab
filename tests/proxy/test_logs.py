"""Logs: the JSON access line, the start line, and a whole run that must leak no secret."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from gateway_harness import (
    MODEL,
    REPO_ROOT,
    Admin,
    FakeStarter,
    Fetched,
    GatewayProcess,
    SettingsFactory,
    fetch,
    new_key,
    poll_until,
    post_chat,
    wait_listening,
)

from proxy.logs import ACCESS_LOGGER, JsonFormatter, TextFormatter
from proxy.server import RunningGateway, start_gateway
from registry import MemoryRegistry

ACCESS_FIELDS = {
    "request_id",
    "method",
    "path",
    "model",
    "provider",
    "status",
    "outcome",
    "duration_ms",
    "ttft_ms",
    "bytes_out",
    "client",
}


@pytest.fixture
def json_access_log() -> Iterator[io.StringIO]:
    """Capture the access logger's records as JSON lines, as GATEWAY_LOG_FORMAT=json does."""
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger(ACCESS_LOGGER)
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    yield output
    access.removeHandler(handler)
    access.setLevel(level)


async def test_json_access_line_has_fields(
    gateway: RunningGateway,
    admin: Admin,
    start_fake: FakeStarter,
    http: aiohttp.ClientSession,
    json_access_log: io.StringIO,
) -> None:
    provider = await start_fake()
    key = new_key()
    await admin.register(key, provider.url)

    answer = await post_chat(http, gateway, pubkey=key, headers=[("X-Request-Id", "trace-42")])
    lines = [orjson.loads(line) for line in json_access_log.getvalue().splitlines()]
    chat = [line for line in lines if line["path"] == "/v1/chat/completions"]

    assert answer.status == 200
    assert len(chat) == 1
    entry = chat[0]
    assert ACCESS_FIELDS <= set(entry)
    assert entry["logger"] == ACCESS_LOGGER
    assert entry["request_id"] == "trace-42"
    assert entry["method"] == "POST"
    assert entry["model"] == MODEL
    assert entry["provider"] == provider.url
    assert entry["status"] == 200
    assert entry["outcome"] == "ok"
    assert entry["bytes_out"] == len(answer.body)
    assert entry["ttft_ms"] > 0
    assert entry["duration_ms"] >= entry["ttft_ms"]
    assert entry["client"] == "127.0.0.1"
    assert "request_id=trace-42" in entry["message"]


@pytest.fixture
async def gateway_with_secret_url(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[RunningGateway]:
    """A gateway whose registry URL contains a password; the injected registry is used instead."""
    caplog.set_level(logging.INFO, logger="proxy.server")
    registry = MemoryRegistry()
    settings = make_settings(registry_url="redis://gw-user:hunter2-pass@192.0.2.1:6390/0")
    running = await start_gateway(settings, registry=registry)
    yield running
    await running.stop()
    await registry.aclose()


async def test_start_line_shows_settings_without_secrets(
    gateway_with_secret_url: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    records = caplog.get_records("setup")
    starts = [r for r in records if r.getMessage().startswith("starting with ")]
    settings = gateway_with_secret_url.gateway.settings

    assert len(starts) == 1
    line = starts[0].getMessage()
    assert "hunter2-pass" not in line
    assert "registry_url=redis://***@192.0.2.1:6390/0" in line
    assert f"provider_tokens_file={settings.provider_tokens_file}" in line
    assert "drain_delay_s=" in line
    fields: dict[str, Any] = starts[0].settings  # type: ignore[attr-defined]
    assert fields["registry_url"] == "redis://***@192.0.2.1:6390/0"
    assert fields["allowed_provider_hosts"] == ["127.0.0.1/32"]
    assert all("hunter2-pass" not in r.getMessage() for r in records)


def write_secret(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return str(path)


class Child:
    """A child process whose stderr goes to a log file and stdout to another."""

    def __init__(self, args: list[str], directory: Path, name: str) -> None:
        self.stdout_path = directory / f"{name}.out"
        self.log_path = directory / f"{name}.log"
        with self.stdout_path.open("wb") as out, self.log_path.open("wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO_ROOT,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )

    async def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.popen.wait, 10)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


async def wait_for(produce: Callable[[], Awaitable[Any]], timeout_s: float = 10.0) -> Any:
    """Return the first true value that ``produce`` returns, polling every 50 ms."""
    value: Any = None

    async def produced() -> bool:
        nonlocal value
        value = await produce()
        return bool(value)

    await poll_until(produced, timeout_s=timeout_s, interval_s=0.05)
    return value


async def test_full_run_logs_contain_no_secret(
    tmp_path: Path,
    spawn: Callable[..., GatewayProcess],
    children: list[Child],
    http: aiohttp.ClientSession,
) -> None:
    provider_token = secrets.token_urlsafe(24)
    admin_token = secrets.token_urlsafe(24)
    client_key = secrets.token_urlsafe(24)
    wrong_token = secrets.token_urlsafe(24)
    upstream_token = secrets.token_urlsafe(24)
    prompt = f"my secret prompt {secrets.token_hex(8)}"
    client_pubkey = secrets.token_hex(32)
    stale_key = new_key()
    digest = hashlib.sha256(client_key.encode()).hexdigest()

    # 1. Start a demo provider, a gateway in JSON format and the heartbeat agent.
    provider = Child(["-m", "proxy.demo", "--port", "0", "--events", "3"], tmp_path, "provider")
    children.append(provider)
    gateway = spawn(
        "gateway.log",
        GATEWAY_LOG_FORMAT="json",
        GATEWAY_DRAIN_DELAY_S="0.1",
        GATEWAY_REQUIRE_ATTESTATION_MATCH="on",
        GATEWAY_PROVIDER_TOKENS_FILE=write_secret(tmp_path / "tokens", f"demo {provider_token}\n"),
        GATEWAY_ADMIN_TOKEN_FILE=write_secret(tmp_path / "admin", admin_token + "\n"),
        GATEWAY_CLIENT_KEYS_FILE=write_secret(tmp_path / "clients", f"tester {digest}\n"),
        GATEWAY_UPSTREAM_TOKEN_FILE=write_secret(tmp_path / "upstream", upstream_token + "\n"),
    )
    await wait_listening(gateway)

    async def provider_url() -> str | None:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)", provider.stdout_path.read_text())
        return found[1] if found else None

    url = await wait_for(provider_url)
    agent = Child(
        [
            "-m",
            "registry.agent",
            "--gateway",
            gateway.admin_url,
            "--token-file",
            write_secret(tmp_path / "provider-token", provider_token + "\n"),
            "--model",
            MODEL,
            "--provider-url",
            url,
        ],
        tmp_path,
        "agent",
    )
    children.append(agent)
    auth = {"Authorization": f"Bearer {client_key}"}

    async def report() -> dict[str, Any] | None:
        answer = await fetch(
            http, "GET", f"{gateway.url}/v1/attestation/report?model={MODEL}", headers=auth
        )
        return answer.json() if answer.status == 200 else None

    published = await wait_for(report)
    model_keys = [a["signing_public_key"] for a in published["model_attestations"]]

    # 2. Send requests that carry every kind of secret, and some that fail.
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    e2ee = {"X-Signing-Algo": "ed25519", "X-Client-Pub-Key": client_pubkey, **auth}

    async def chat(payload: dict[str, Any], headers: dict[str, str]) -> Fetched:
        url = gateway.url + "/v1/chat/completions"
        return await fetch(http, "POST", url, data=orjson.dumps(payload), headers=headers)

    ok = await chat(body, {**e2ee, "X-Model-Pub-Key": model_keys[0]})
    plain = await chat({**body, "stream": False}, auth)
    stale = await chat(body, {**auth, "X-Model-Pub-Key": stale_key})
    bad_client = await chat(body, {"Authorization": f"Bearer {wrong_token}"})
    bad_beat = await Admin(http, gateway.admin_url).heartbeat({"x": 1}, token=wrong_token)
    listing = await fetch(
        http,
        "GET",
        gateway.admin_url + "/v1/providers",
        headers={"Authorization": f"Bearer {admin_token}"},
    )

    # 3. Stop everything: the agent deregisters first.
    agent_code = await agent.stop()
    gateway.send_signal(signal.SIGTERM)
    gateway_code = await gateway.wait_exit(15)
    await provider.stop()
    logs = {
        "gateway": gateway.log(),
        "agent": agent.log_path.read_text(),
        "provider": provider.log_path.read_text(),
    }

    assert [ok.status, plain.status, stale.status] == [200, 200, 421]
    assert bad_client.status == 401
    assert bad_beat.status == 401
    assert listing.status == 200
    assert agent_code == 0
    assert gateway_code == 0
    secret_values = {
        "provider token": provider_token,
        "admin token": admin_token,
        "client key": client_key,
        "wrong token": wrong_token,
        "upstream token": upstream_token,
        "prompt": prompt,
        "client public key": client_pubkey,
        "stale key": stale_key,
        **{f"model key {i}": key for i, key in enumerate(model_keys)},
    }
    for source, text in logs.items():
        for name, value in secret_values.items():
            assert value.lower() not in text.lower(), f"{name} in the {source} log"
    gateway_lines = [orjson.loads(line) for line in logs["gateway"].splitlines()]
    access = [line for line in gateway_lines if line["logger"] == ACCESS_LOGGER]
    assert {line["status"] for line in access} >= {200, 421, 401}
    assert any(line["message"].startswith("starting with ") for line in gateway_lines)
    assert gateway_lines[-1]["message"] == "stopped"


_SHARED_TEXT_FORMATTER = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


@pytest.mark.parametrize(
    "created",
    [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0005, 1_700_000_059.5, 1_700_003_600.25],
)
def test_text_formatter_matches_stdlib_time(created: float) -> None:
    # The shared formatter gets the cases' times in order, as a process does, so its
    # per-second cache crosses each boundary. logging.Formatter is the reference.
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    record = logging.LogRecord("proxy.access", logging.INFO, "", 0, "line %s", ("x",), None)
    record.created = created
    record.msecs = (created - int(created)) * 1000

    assert TextFormatter(fmt).format(record) == logging.Formatter(fmt).format(record)
    assert _SHARED_TEXT_FORMATTER.format(record) == logging.Formatter(fmt).format(record)
