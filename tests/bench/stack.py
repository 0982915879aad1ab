"""The system under test: redis-server, the fake provider, nginx and the gateway.

Everything binds 127.0.0.1 on free ports and keeps its files in one temporary
directory. The gateway runs as ``python -m proxy`` in its default configuration (access
log and metrics on) with a Redis registry on the benchmark's own redis-server. Its log
goes to ``gateway.log`` in the temporary directory. The fake provider is registered by
a heartbeat and kept registered by ``HeartbeatRefresher``.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson

from tests.bench.procs import Children, Pinning, free_port, wait_for_port
from tests.bench.upstream import MODEL

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0
HEARTBEAT_TTL_S = 300.0
"""The maximum lease the gateway grants by default (GATEWAY_HEARTBEAT_TTL_MAX_S)."""
REFRESH_INTERVAL_S = 30.0
PROVIDER_TOKEN_IDENTITY = "bench"

_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    {access_log}
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 1000000;
    upstream provider {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://provider;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def redis_command(port: int, *args: str, timeout_s: float = 2.0) -> bytes:
    """Send one command to the benchmark's redis-server and return the raw reply."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        reply = sock.recv(65536)
        if reply.startswith(b"$"):
            # A bulk string: read until its announced length has arrived.
            length = int(reply[1 : reply.find(b"\r\n")])
            while len(reply) < reply.find(b"\r\n") + 2 + length + 2:
                more = sock.recv(65536)
                if not more:
                    break
                reply += more
        return reply


def redis_command_calls(port: int) -> dict[str, int]:
    """Return the calls per command from ``INFO commandstats``, without INFO itself."""
    calls: dict[str, int] = {}
    for line in redis_command(port, "INFO", "commandstats").decode().splitlines():
        if not line.startswith("cmdstat_"):
            continue
        name, _, fields = line.partition(":")
        command = name.removeprefix("cmdstat_")
        if command == "info":
            continue
        for field in fields.split(","):
            key, _, value = field.partition("=")
            if key == "calls":
                calls[command] = int(value)
    return calls


@dataclass(slots=True)
class Stack:
    """The started processes and their ports; every file they write is in ``tmp``."""

    tmp: Path
    children: Children
    pinning: Pinning
    nginx_access_log: bool
    pubkey: str = ""
    redis_port: int = 0
    upstream_port: int = 0
    nginx_port: int = 0
    gateway_port: int = 0
    naive_port: int = 0
    admin_port: int = 0
    redis: subprocess.Popen[bytes] | None = None
    upstream: subprocess.Popen[bytes] | None = None
    nginx: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    naive: subprocess.Popen[bytes] | None = None
    _provider_token: str = ""

    def start(self) -> None:
        """Start redis-server, the fake provider, nginx and the gateway, then register."""
        self.pubkey = secrets.token_hex(32)
        self._provider_token = secrets.token_hex(16)
        self.redis_port = free_port()
        self.upstream_port = free_port()
        self.nginx_port = free_port()
        self.gateway_port = free_port()
        self.naive_port = free_port()
        self.admin_port = free_port()
        self._start_redis()
        self._start_upstream()
        self.start_nginx()
        self.start_gateway()
        self._start_naive()
        self.heartbeat()

    def _start_redis(self) -> None:
        # No persistence and no protected-mode surprises: a throwaway server on loopback.
        argv = [
            *self.pinning.server,
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.redis_port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.tmp),
        ]
        self.redis = self.children.start("redis-server", argv, log_path=self.tmp / "redis.log")
        wait_for_port(self.redis_port, self.redis, START_TIMEOUT_S)

    def _start_upstream(self) -> None:
        argv = [
            *self.pinning.server,
            sys.executable,
            "-m",
            "tests.bench.upstream",
            "--port",
            str(self.upstream_port),
            "--pubkey",
            self.pubkey,
        ]
        self.upstream = self.children.start(
            "fake provider", argv, log_path=self.tmp / "upstream.log", cwd=REPO_ROOT
        )
        wait_for_port(self.upstream_port, self.upstream, START_TIMEOUT_S)

    def _start_naive(self) -> None:
        argv = [
            *self.pinning.server,
            sys.executable,
            "-m",
            "tests.bench.naive",
            "--port",
            str(self.naive_port),
            "--redis-port",
            str(self.redis_port),
        ]
        self.naive = self.children.start(
            "naive pass-through", argv, log_path=self.tmp / "naive.log", cwd=REPO_ROOT
        )
        wait_for_port(self.naive_port, self.naive, START_TIMEOUT_S)

    def start_nginx(self) -> None:
        """Start (or restart) nginx with one worker process on the same port."""
        if self.nginx is not None:
            self.children.stop(self.nginx)
        access_log = (
            f"access_log {self.tmp}/nginx-access.log;"
            if self.nginx_access_log
            else "access_log off;"
        )
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.format(
                tmp=self.tmp,
                port=self.nginx_port,
                upstream_port=self.upstream_port,
                access_log=access_log,
                nofile=20000,
                connections=16384,
            )
        )
        argv = [*self.pinning.server, "nginx", "-p", str(self.tmp), "-c", str(conf)]
        self.nginx = self.children.start("nginx", argv, log_path=self.tmp / "nginx-stderr.log")
        wait_for_port(self.nginx_port, self.nginx, START_TIMEOUT_S)

    def gateway_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        tokens = self.tmp / "provider_tokens"
        tokens.write_text(f"{PROVIDER_TOKEN_IDENTITY} {self._provider_token}\n")
        tokens.chmod(0o600)
        # Settings from the caller's environment would change the configuration measured.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(
            {
                "GATEWAY_REGISTRY_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_PORT": str(self.gateway_port),
                "GATEWAY_ADMIN_HOST": "127.0.0.1",
                "GATEWAY_ADMIN_PORT": str(self.admin_port),
                "GATEWAY_PROVIDER_TOKENS_FILE": str(tokens),
                "GATEWAY_ALLOWED_PROVIDER_HOSTS": "127.0.0.1/32",
            }
        )
        env.update(extra or {})
        return env

    def start_gateway(self, extra_env: dict[str, str] | None = None) -> None:
        """Start (or restart) the gateway on the same ports; ``extra_env`` adds settings."""
        if self.gateway is not None:
            # The second SIGTERM skips the drain delay, which only matters to real clients.
            self.children.stop(self.gateway, repeat_after_s=0.5)
        argv = [*self.pinning.server, sys.executable, "-m", "proxy"]
        self.gateway = self.children.start(
            "gateway",
            argv,
            log_path=self.tmp / "gateway.log",
            env=self.gateway_env(extra_env),
            cwd=REPO_ROOT,
        )
        wait_for_port(self.gateway_port, self.gateway, START_TIMEOUT_S)
        wait_for_port(self.admin_port, self.gateway, START_TIMEOUT_S)

    def heartbeat(self) -> None:
        """Register the fake provider with the gateway; raise RuntimeError if rejected."""
        body = {
            "pubkey": self.pubkey,
            "signing_algo": "ed25519",
            "model": MODEL,
            "url": f"http://127.0.0.1:{self.upstream_port}",
            "ttl_s": HEARTBEAT_TTL_S,
            "instance_id": "bench",
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/v1/providers/heartbeat",
            data=orjson.dumps(body),
            headers={
                "Authorization": f"Bearer {self._provider_token}",
                "Content-Type": "application/json",
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise RuntimeError(f"the gateway rejected the heartbeat: {exc.code} {detail}") from exc

    def gateway_warnings(self, limit: int = 10) -> list[tuple[str, int]]:
        """Return the gateway's WARNING and ERROR log lines grouped by text, most frequent first.

        Digits are replaced by N so that lines differing only in numbers group together.
        The harness's own restarts (a second SIGTERM) are left out.
        """
        counts: Counter[str] = Counter()
        log = self.tmp / "gateway.log"
        if not log.exists():
            return []
        for line in log.read_text(errors="replace").splitlines():
            _, _, rest = line.partition(" WARNING ")
            if not rest:
                _, _, rest = line.partition(" ERROR ")
            if not rest or "second signal" in rest:
                continue
            counts[re.sub(r"\d+", "N", rest)[:160]] += 1
        return counts.most_common(limit)


class HeartbeatRefresher:
    """Renews the fake provider's lease every REFRESH_INTERVAL_S on a daemon thread."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat-refresher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.wait(REFRESH_INTERVAL_S):
            try:
                self._stack.heartbeat()
            except (OSError, RuntimeError) as exc:
                # A restart of the gateway between scenarios: the next round retries, and
                # the lease (HEARTBEAT_TTL_S) outlasts many missed rounds.
                logger.warning("heartbeat refresh failed: %s", exc)
