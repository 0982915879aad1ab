"""The e2ee-registry command against the session's redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from redis_processes import resp_command

from proxy.config import Settings
from proxy.server import start_gateway
from registry import Heartbeat, MemoryRegistry, open_registry
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
        registry = open_registry(url, prefix=prefix, snapshot=False)
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


# --- evict, prune, watch ------------------------------------------------------------


def test_evict_removes_one_endpoint(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    seed(redis_url, beat(KEY, URL_1), beat(KEY, URL_2))

    code = main(["--registry-url", redis_url, "evict", KEY, "--url", URL_1])
    out = capsys.readouterr().out
    main(["--registry-url", redis_url, "list", "--json"])
    [entry] = json.loads(capsys.readouterr().out)["entries"]

    assert code == 0
    assert out == f"evicted {KEY[:16]}… {URL_1}\n"
    assert sorted(entry["endpoints"]) == [URL_2]


def test_evict_json_lists_every_url(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    seed(redis_url, beat(KEY, URL_1), beat(KEY, URL_2, owner="bob"))

    code = main(["--registry-url", redis_url, "evict", "--json", KEY])
    document = json.loads(capsys.readouterr().out)

    assert code == 0
    assert document == {"pubkey": KEY, "removed": [URL_1, URL_2]}


def test_evict_unknown_key_exits_1(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--registry-url", redis_url, "evict", KEY])
    captured = capsys.readouterr()

    assert code == 1
    assert captured.out == ""
    assert f"no endpoint of key {KEY[:16]}…" in captured.err


def test_prune_prints_removed_count(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # seed waits for the last lease it wrote, so the short one goes last.
    seed(redis_url, beat(KEY, URL_2), beat(KEY, URL_1, ttl_s=0.2), wait_expiry=True)

    code = main(["--registry-url", redis_url, "prune"])
    out = capsys.readouterr().out
    again = main(["--registry-url", redis_url, "prune", "--json"])
    document = json.loads(capsys.readouterr().out)

    assert code == 0
    assert out == "removed 1 expired endpoint(s)\n"
    assert again == 0
    assert document == {"removed": 0}


def _port(redis_url: str) -> int:
    port = urlsplit(redis_url).port
    assert port is not None
    return port


def _wait_for_subscriber(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 10.0
    while b":1\r\n" not in resp_command(port, "PUBSUB", "NUMSUB", "e2ee:events"):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "watch did not subscribe"
        time.sleep(0.02)


def test_watch_prints_each_event(redis_url: str) -> None:
    env = {**os.environ, "GATEWAY_REGISTRY_URL": redis_url}
    command = [sys.executable, "-m", "registry.cli", "watch", "--count", "3", "--json"]
    with subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            _wait_for_subscriber(_port(redis_url), process)
            seed(redis_url, beat(KEY, URL_1), beat(KEY, URL_1))
            main(["--registry-url", redis_url, "evict", KEY])
            out, err = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
    events = [json.loads(line) for line in out.splitlines()]

    assert process.returncode == 0, err
    assert [e["event"] for e in events] == ["register", "refresh", "deregister"]
    assert {e["pubkey"] for e in events} == {KEY}
    assert {e["url"] for e in events} == {URL_1}
    assert all(isinstance(e["received_at"], float) for e in events)


def test_watch_text_line_per_event(redis_url: str) -> None:
    command = [sys.executable, "-m", "registry.cli", "--registry-url", redis_url, "watch"]
    with subprocess.Popen(
        [*command, "--count", "1"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            _wait_for_subscriber(_port(redis_url), process)
            seed(redis_url, beat(ECDSA_KEY, URL_2))
            out, err = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()

    assert process.returncode == 0, err
    [line] = out.splitlines()
    assert line.split()[1:] == ["register", ECDSA_KEY[:16] + "…", "llama", URL_2]
    assert "watching e2ee:events" in err


@pytest.mark.parametrize("command", ["watch", "prune"])
def test_gateway_mode_rejects_redis_only(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("t0ken\n", encoding="utf-8")
    argv = ["--gateway", "http://127.0.0.1:9", "--admin-token-file", str(token_file), command]

    with pytest.raises(SystemExit) as caught:
        main(argv)

    assert caught.value.code == 2
    assert f"{command} needs --registry-url" in capsys.readouterr().err


def test_gateway_mode_needs_token_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--gateway", "http://127.0.0.1:9", "list"])

    assert caught.value.code == 2
    assert "--admin-token-file" in capsys.readouterr().err


# --- the gateway's admin API (memory://) -----------------------------------------------


async def _cli(*argv: str) -> tuple[int, str, str]:
    """Run e2ee-registry in a subprocess, so that this loop keeps serving the gateway."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "registry.cli",
        *argv,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_gateway_mode_lists_shows_and_evicts(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("admin-t0ken\n", encoding="utf-8")
    wrong_file = tmp_path / "wrong-token"
    wrong_file.write_text("wr0ng-t0ken\n", encoding="utf-8")
    registry = MemoryRegistry()
    settings = Settings(port=0, admin_port=0, admin_token_file=str(token_file))
    running = await start_gateway(settings, registry=registry)
    try:
        await registry.heartbeat(beat(KEY, URL_1))
        await registry.heartbeat(beat(KEY, URL_2, owner="bob"))
        target = ["--gateway", running.admin_url, "--admin-token-file", str(token_file)]

        list_code, list_out, _ = await _cli(*target, "list", "--json")
        show_code, show_out, _ = await _cli(*target, "show", KEY)
        evict_code, evict_out, _ = await _cli(*target, "evict", KEY, "--url", URL_1)
        missing_code, _, missing_err = await _cli(*target, "evict", ECDSA_KEY)
        denied = ["--gateway", running.admin_url, "--admin-token-file", str(wrong_file)]
        denied_code, _, denied_err = await _cli(*denied, "list")
        entry = await registry.get(KEY)
    finally:
        await running.stop()
        await running.gateway.aclose()

    [listed] = json.loads(list_out)["entries"]
    assert list_code == 0
    assert sorted(listed["endpoints"]) == [URL_1, URL_2]
    assert listed["endpoints"][URL_2]["owner"] == "bob"
    assert show_code == 0
    assert f"key           {KEY}" in show_out
    assert evict_code == 0
    assert evict_out == f"evicted {KEY[:16]}… {URL_1}\n"
    assert entry is not None
    assert [e.url for e in entry.endpoints] == [URL_2]
    assert missing_code == 1
    assert "no endpoint of key" in missing_err
    assert denied_code == 3
    assert "HTTP 401" in denied_err
    assert "wr0ng-t0ken" not in denied_err


# --- the README's redis-cli recipes ----------------------------------------------------


def _redis_cli(port: int, *args: str) -> list[str]:
    binary = shutil.which("redis-cli")
    if binary is None:
        pytest.skip("redis-cli is not installed")
    completed = subprocess.run(
        [binary, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return completed.stdout.splitlines()


def test_redis_cli_recipes_match_list_json(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(redis_url, beat(KEY, URL_1), beat(KEY, URL_2, owner="bob"), beat(ECDSA_KEY, URL_1))
    main(["--registry-url", redis_url, "list", "--json"])
    listed = {e["pubkey"]: e for e in json.loads(capsys.readouterr().out)["entries"]}
    for entry in listed.values():
        for endpoint in entry["endpoints"].values():
            del endpoint["seconds_left"]

    hgetall = _redis_cli(_port(redis_url), "HGETALL", "e2ee:providers")
    [hget] = _redis_cli(_port(redis_url), "HGET", "e2ee:providers", KEY)
    zrange = _redis_cli(_port(redis_url), "ZRANGE", "e2ee:expiry", "0", "-1", "WITHSCORES")

    stored = {
        field: json.loads(value) for field, value in zip(hgetall[::2], hgetall[1::2], strict=True)
    }
    assert set(stored) == set(listed)
    for pubkey, value in stored.items():
        assert {"pubkey": pubkey, **value} == listed[pubkey]
    assert json.loads(hget) == stored[KEY]
    scores = {member: float(score) for member, score in zip(zrange[::2], zrange[1::2], strict=True)}
    expected = {
        f"{pubkey} {url}": endpoint["expires_at"]
        for pubkey, entry in listed.items()
        for url, endpoint in entry["endpoints"].items()
    }
    assert scores == expected
