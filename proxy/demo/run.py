"""``make run``: the gateway on memory://, one demo provider and its heartbeat agent.

Starts three processes on 127.0.0.1, waits until the demo model is routable, prints
curl commands to try, and stops everything on Ctrl-C (SIGINT) or SIGTERM. The gateway
logs to this terminal; the demo provider and the agent log to files in a temporary
directory that also holds the run's tokens and is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

MODEL = "demo-model"


def _wait_for(url: str, what: str, deadline_s: float, accept: str | None = None) -> str:
    """Poll ``url`` until it returns 200 (containing ``accept``, if given) and return the body."""
    deadline = time.monotonic() + deadline_s
    last_error = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                body: str = response.read().decode()
                if accept is None or accept in body:
                    return body
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.2)
    raise SystemExit(f"{what} did not become ready within {deadline_s:.0f} s ({last_error})")


def _start(
    name: str, args: list[str], env: dict[str, str], log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a child; its output goes to ``log`` when given, else to this terminal."""
    where = f" (log: {log})" if log else ""
    print(f"starting {name}: {' '.join(args[1:])}{where}", flush=True)
    output = log.open("wb") if log else None
    # A session of its own keeps the terminal's Ctrl-C away from the child, so that
    # main() can stop the children in order: the agent deregisters while the gateway
    # still runs.
    try:
        return subprocess.Popen(args, env=env, start_new_session=True, stdout=output, stderr=output)
    finally:
        if output is not None:
            output.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="gateway public port")
    parser.add_argument("--admin-port", type=int, default=9090, help="gateway admin port")
    parser.add_argument("--provider-port", type=int, default=8000, help="demo provider port")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="e2ee-gateway-run-"))
    provider_token = secrets.token_urlsafe(24)
    (workdir / "provider-tokens").write_text(f"demo {provider_token}\n")
    (workdir / "provider-token").write_text(provider_token + "\n")
    (workdir / "admin-token").write_text(secrets.token_urlsafe(24) + "\n")
    for path in workdir.iterdir():
        path.chmod(0o600)

    gateway_url = f"http://127.0.0.1:{args.port}"
    admin_url = f"http://127.0.0.1:{args.admin_port}"
    provider_url = f"http://127.0.0.1:{args.provider_port}"
    env = dict(os.environ)
    env.update(
        GATEWAY_REGISTRY_URL="memory://",
        GATEWAY_PORT=str(args.port),
        GATEWAY_ADMIN_PORT=str(args.admin_port),
        GATEWAY_PROVIDER_TOKENS_FILE=str(workdir / "provider-tokens"),
        GATEWAY_ADMIN_TOKEN_FILE=str(workdir / "admin-token"),
        # The demo provider runs on loopback, which provider URLs may not use by default.
        GATEWAY_ALLOWED_PROVIDER_HOSTS="127.0.0.1/32",
        # No load balancer watches /readyz here, so Ctrl-C need not wait for one.
        GATEWAY_DRAIN_DELAY_S="0",
        GATEWAY_SHUTDOWN_GRACE_S="5",
    )
    python = sys.executable
    processes: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps
    # that disposition, so `make run &` would otherwise ignore a later SIGINT.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        processes.append(
            _start(
                "demo provider",
                [python, "-m", "proxy.demo", "--port", str(args.provider_port), "--model", MODEL],
                env,
                workdir / "provider.log",
            )
        )
        processes.append(_start("gateway", [python, "-m", "proxy"], env))
        _wait_for(provider_url + "/health", "the demo provider", 20)
        _wait_for(gateway_url + "/healthz", "the gateway", 20)
        processes.append(
            _start(
                "heartbeat agent",
                [
                    python,
                    "-m",
                    "registry.agent",
                    "--gateway",
                    admin_url,
                    "--token-file",
                    str(workdir / "provider-token"),
                    "--model",
                    MODEL,
                    "--provider-url",
                    provider_url,
                ],
                env,
                workdir / "agent.log",
            )
        )
        _wait_for(gateway_url + "/v1/models", "registration of the demo provider", 20, accept=MODEL)
        report = json.loads(
            _wait_for(
                f"{gateway_url}/v1/attestation/report?model={MODEL}&signing_algo=ed25519",
                "the attestation report",
                10,
            )
        )
        key = report["model_attestations"][0]["signing_public_key"]
        print(_instructions(gateway_url, admin_url, key, workdir), flush=True)

        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        print("a process exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
        return 0
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # The directory holds the tokens of this run and the children's logs.
        shutil.rmtree(workdir, ignore_errors=True)


def _instructions(gateway: str, admin: str, key: str, workdir: Path) -> str:
    stale = "0" * 64
    body = '{"model":"demo-model","stream":true,"messages":[{"role":"user","content":"Hello"}]}'
    return f"""
The gateway is ready. Try it from another terminal:

  # a streamed completion, balanced over the live providers of demo-model
  curl -N {gateway}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{body}'

  # the demo provider's attestation report (this is where E2EE clients get the key)
  curl '{gateway}/v1/attestation/report?model=demo-model&signing_algo=ed25519'

  # a request pinned to the demo key
  curl -N {gateway}/v1/chat/completions -H 'X-Model-Pub-Key: {key}' \\
       -H 'Content-Type: application/json' -d '{body}'

  # a stale key: HTTP 421, the client should refresh its attestation report
  curl -i {gateway}/v1/chat/completions -H 'X-Model-Pub-Key: {stale}' \\
       -H 'Content-Type: application/json' -d '{body}'

  # the registry as the admin sees it
  curl -H "Authorization: Bearer $(cat {workdir}/admin-token)" {admin}/v1/providers

Press Ctrl-C to stop.
"""


if __name__ == "__main__":
    sys.exit(main())
