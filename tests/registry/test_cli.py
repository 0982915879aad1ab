"""The e2ee-registry command against the session's redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry import Heartbeat, open_registry
from registry.cli import main

pytestmark = pytest.mark.redis_server

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = "e5" * 32
ECDSA_KEY = "f6" * 64
URL_1 = "http://192.0.2.1:8000"
URL_2 = "http://192.0.2.2:8000"


def beat(
    pubkey: str = KEY, url: str = URL_1, *, ttl_s: float = 60.0, owner: str = "alice"
) -> Heartbeat:
    algo = "ed25519" if len(pubkey) == 64 else "ecdsa"
    return Heartbeat(pubkey, "llama", url, algo, owner, ttl_s, "inst-1")


def seed(url: str, *beats: Heartbeat, prefix: str = "e2ee", wait_expiry: bool = False) -> None:
    """Write heartbeats; with ``wait_expiry``, return once the last lease has ended."""

    async def write() -> None:
        registry = open_registry(url, prefix=prefix)
        try:
            expires_at = 0.0
            for heartbeat in beats:
                expires_at = (await registry.heartbeat(heartbeat)).expires_at
            deadline = time.monotonic() + 3.0
            while wait_expiry and await registry.now() <= expires_at:
                assert time.monotonic() < deadline, "lease did not end"
                await asyncio.sleep(0.02)
        finally:
            await registry.aclose()

    asyncio.run(write())


@pytest.fixture(autouse=True)
def no_registry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_REGISTRY_URL", raising=False)
    monkeypatch.delenv("GATEWAY_REDIS_PREFIX", raising=False)


def test_list_subprocess_prints_table(redis_url: str) -> None:
    seed(redis_url, beat(KEY, URL_1), beat(ECDSA_KEY, URL_2, owner="bob"))
    env = {**os.environ, "GATEWAY_REGISTRY_URL": redis_url}

    completed = subprocess.run(
        [sys.executable, "-m", "registry.cli", "list"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    header, *rows = completed.stdout.splitlines()

    assert completed.returncode == 0, completed.stderr
    assert header.split() == ["KEY", "MODEL", "ALGO", "URL", "OWNER", "SECONDS_LEFT"]
    assert len(rows) == 2
    assert rows[0].split()[:5] == [KEY[:16] + "…", "llama", "ed25519", URL_1, "alice"]
    assert rows[1].split()[:5] == [ECDSA_KEY[:16] + "…", "llama", "ecdsa", URL_2, "bob"]
    assert 55.0 < float(rows[0].split()[5]) <= 60.0


def test_list_marks_expired_endpoint(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    seed(redis_url, beat(ttl_s=0.2), wait_expiry=True)

    code = main(["--registry-url", redis_url, "list"])
    row = capsys.readouterr().out.splitlines()[1]

    assert code == 0
    assert row.endswith("(expired)")
    assert float(row.split()[-2]) <= 0.0


def test_list_json_matches_layout(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    seed(redis_url, beat(KEY, URL_1), beat(KEY, URL_2))

    code = main(["list", "--json", "--registry-url", redis_url])
    document = json.loads(capsys.readouterr().out)

    assert code == 0
    assert isinstance(document["now"], float)
    [entry] = document["entries"]
    assert entry["pubkey"] == KEY
    assert entry["model"] == "llama"
    assert entry["signing_algo"] == "ed25519"
    assert sorted(entry["endpoints"]) == [URL_1, URL_2]
    assert set(entry["endpoints"][URL_1]) == {
        "owner",
        "instance_id",
        "registered_at",
        "last_heartbeat",
        "expires_at",
        "seconds_left",
    }


def test_list_empty_registry_prints_notice(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--registry-url", redis_url, "list"])
    captured = capsys.readouterr()

    assert code == 0
    assert captured.out == ""
    assert "no provider entries" in captured.err


def test_list_reads_given_prefix(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    seed(redis_url, beat(), prefix="staging")

    default_code = main(["--registry-url", redis_url, "list", "--json"])
    default_entries = json.loads(capsys.readouterr().out)["entries"]
    code = main(["--registry-url", redis_url, "--prefix", "staging", "list", "--json"])
    entries = json.loads(capsys.readouterr().out)["entries"]

    assert default_code == 0
    assert default_entries == []
    assert code == 0
    assert [e["pubkey"] for e in entries] == [KEY]


def test_show_prints_full_entry(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    seed(redis_url, beat(KEY, URL_1), beat(KEY, URL_2, owner="bob"))

    code = main(["--registry-url", redis_url, "show", KEY.upper()])
    out = capsys.readouterr().out

    assert code == 0
    assert f"key           {KEY}" in out
    assert "endpoints     2" in out
    for field in ("url", "owner", "instance_id", "registered_at", "last_heartbeat"):
        assert out.count(f"  {field} ") == 2, field
    assert out.count("  expires_at ") == 2
    assert URL_2 in out
    assert "bob" in out


def test_show_json_has_entry(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    seed(redis_url, beat())

    code = main(["--registry-url", redis_url, "show", "--json", KEY])
    document = json.loads(capsys.readouterr().out)

    assert code == 0
    assert document["entry"]["pubkey"] == KEY
    assert document["entry"]["endpoints"][URL_1]["owner"] == "alice"


def test_show_unknown_key_exits_1(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--registry-url", redis_url, "show", KEY])
    captured = capsys.readouterr()

    assert code == 1
    assert captured.out == ""
    assert f"no provider entry for key {KEY[:16]}…" in captured.err


def test_show_invalid_key_exits_2(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--registry-url", redis_url, "show", "xyz"])

    assert caught.value.code == 2
    assert "hex" in capsys.readouterr().err


def test_memory_url_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--registry-url", "memory://", "list"])

    assert caught.value.code == 2
    assert "memory://" in capsys.readouterr().err


def test_missing_url_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["list"])

    assert caught.value.code == 2
    assert "GATEWAY_REGISTRY_URL" in capsys.readouterr().err


def test_unreachable_registry_exits_3(
    unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://user:s3cret@127.0.0.1:{unused_tcp_port}/0"

    code = main(["--registry-url", url, "--timeout-s", "0.5", "list"])
    err = capsys.readouterr().err

    assert code == 3
    assert "error: registry redis://***@127.0.0.1" in err
    assert "s3cret" not in err
