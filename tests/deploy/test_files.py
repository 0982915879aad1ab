"""The files under deploy/: they parse, and they keep the settings the gateway relies on.

No Docker engine or Kubernetes cluster runs the tests, so images, compose files and
manifests are checked as text and YAML only; HAProxy and nginx check their own files.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_harness import DEPLOY, placeholders, render, require_binary

from proxy.config import Settings

DEFAULTS = Settings()
# The maximum silence a load balancer must wait through on a healthy stream.
MAX_GATEWAY_SILENCE_S = max(DEFAULTS.first_byte_timeout_s, DEFAULTS.idle_timeout_s)
SAMPLE_VALUES = {
    "HAPROXY_BIND": "127.0.0.1:18080",
    "CHECK_INTER": "200ms",
    "GATEWAY_1_HOST": "127.0.0.1",
    "GATEWAY_1_PORT": "18081",
    "GATEWAY_2_HOST": "127.0.0.1",
    "GATEWAY_2_PORT": "18082",
    "NGINX_LISTEN": "127.0.0.1:18090",
}


def seconds(value: str) -> float:
    """Parse an HAProxy or nginx duration such as 310s, 200ms or 5m."""
    found = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert found, value
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[found[2]]
    return int(found[1]) * scale


def directives(path: Path) -> list[list[str]]:
    """Return each non-comment line of a config file split into words."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip().rstrip(";")
        if line:
            lines.append(shlex.split(line))
    return lines


def values_of(path: Path, name: str) -> list[list[str]]:
    return [words[1:] for words in directives(path) if words[0] == name]


def test_haproxy_config_checks_readiness() -> None:
    config = DEPLOY / "haproxy.cfg"
    options = values_of(config, "option")

    assert ["httpchk", "GET", "/readyz"] in options
    assert ["redispatch", "1"] in options
    assert values_of(config, "http-check") == [["expect", "status", "200"]]
    assert values_of(config, "retry-on") == [["conn-failure"]]
    assert values_of(config, "retries") == [["3"]]
    assert not any("shutdown-sessions" in words for words in directives(config))


def test_haproxy_timeouts_outlast_gateway() -> None:
    config = DEPLOY / "haproxy.cfg"
    timeouts = {words[0]: seconds(words[1]) for words in values_of(config, "timeout")}

    assert timeouts["server"] > MAX_GATEWAY_SILENCE_S
    assert timeouts["client"] > MAX_GATEWAY_SILENCE_S
    assert timeouts["tunnel"] > MAX_GATEWAY_SILENCE_S


def test_nginx_config_streams_unbuffered() -> None:
    config = DEPLOY / "nginx.conf"

    assert values_of(config, "proxy_http_version") == [["1.1"]]
    assert values_of(config, "proxy_buffering") == [["off"]]
    assert values_of(config, "proxy_request_buffering") == [["off"]]
    assert values_of(config, "keepalive") == [["64"]]
    assert ["Connection", ""] in values_of(config, "proxy_set_header")
    assert values_of(config, "proxy_next_upstream") == [["error", "timeout"]]
    assert not any("non_idempotent" in words for words in directives(config))
    assert seconds(values_of(config, "proxy_read_timeout")[0][0]) > MAX_GATEWAY_SILENCE_S


def test_nginx_config_uses_placeholders_for_paths() -> None:
    names = placeholders(DEPLOY / "nginx.conf")

    assert {"NGINX_LISTEN", "NGINX_RUN_DIR", "NGINX_LOG_DIR"} <= names
    assert values_of(DEPLOY / "nginx.conf", "listen") == [["${NGINX_LISTEN}"]]
    assert "daemon" not in {words[0] for words in directives(DEPLOY / "nginx.conf")}


def test_haproxy_accepts_rendered_config(tmp_path: Path) -> None:
    binary = require_binary("haproxy", "haproxy")
    config = render(DEPLOY / "haproxy.cfg", tmp_path / "haproxy.cfg", SAMPLE_VALUES)

    checked = subprocess.run(
        [binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_nginx_accepts_rendered_config(tmp_path: Path) -> None:
    binary = require_binary("nginx", "nginx")
    values = {**SAMPLE_VALUES, "NGINX_RUN_DIR": str(tmp_path), "NGINX_LOG_DIR": str(tmp_path)}
    config = render(DEPLOY / "nginx.conf", tmp_path / "nginx.conf", values)

    checked = subprocess.run(
        [
            binary,
            "-t",
            "-c",
            str(config),
            "-p",
            str(tmp_path),
            "-e",
            str(tmp_path / "error.log"),
            "-g",
            "daemon off;",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert checked.returncode == 0, checked.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n\s*", " ", text)
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def test_dockerfile_has_required_instructions() -> None:
    instructions = dockerfile_instructions()
    by_keyword: dict[str, list[str]] = {}
    for keyword, arguments in instructions:
        by_keyword.setdefault(keyword, []).append(arguments)

    assert by_keyword["ARG"][0].startswith("PYTHON_IMAGE=python:3.11-slim")
    assert by_keyword["ENTRYPOINT"] == ['["e2ee-gateway"]']
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    assert len(by_keyword["HEALTHCHECK"]) == 1
    assert "/healthz" in by_keyword["HEALTHCHECK"][0]
    assert by_keyword["USER"][-1].split(":")[0] not in {"0", "root"}
    # USER comes after the last RUN, so nothing in the final image runs as root.
    last_run = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "RUN")
    last_user = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "USER")
    assert last_user > last_run


def load_yaml(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as stream:
        return [document for document in yaml.safe_load_all(stream) if document is not None]


def test_compose_file_defines_services() -> None:
    (compose,) = load_yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    drain = DEFAULTS.drain_delay_s + DEFAULTS.shutdown_grace_s

    assert set(services) == {
        "redis",
        "gateway-1",
        "gateway-2",
        "haproxy",
        "demo-provider",
        "heartbeat",
    }
    for name in ("gateway-1", "gateway-2"):
        gateway = services[name]
        assert gateway["environment"]["GATEWAY_REGISTRY_URL"].startswith("redis://redis:")
        assert gateway["environment"]["GATEWAY_PROVIDER_TOKENS_FILE"].startswith("/run/secrets/")
        assert seconds(gateway["stop_grace_period"]) > drain
    assert all("file" in secret for secret in compose["secrets"].values())
    assert services["haproxy"]["ports"] == ["127.0.0.1:8080:8080"]
    assert services["heartbeat"]["secrets"] == ["provider_token"]


def kubernetes_objects() -> dict[str, list[dict[str, Any]]]:
    objects: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in load_yaml(path):
            objects.setdefault(document["kind"], []).append(document)
    return objects


def test_kubernetes_manifests_parse() -> None:
    objects = kubernetes_objects()

    assert set(objects) == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Kustomization",
    }
    assert len(objects["Service"]) == 2
    assert objects["PodDisruptionBudget"][0]["spec"]["minAvailable"] == 1
    listed = set(objects["Kustomization"][0]["resources"])
    on_disk = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_kubernetes_grace_covers_drain() -> None:
    objects = kubernetes_objects()
    config = objects["ConfigMap"][0]["data"]
    pod = objects["Deployment"][0]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    drain = float(config["GATEWAY_DRAIN_DELAY_S"]) + float(config["GATEWAY_SHUTDOWN_GRACE_S"])

    assert pause[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pause[1]) + drain
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True


def unit_settings(name: str) -> dict[str, list[str]]:
    """Return each key of a systemd unit with all its values (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    text = (DEPLOY / "systemd" / name).read_text(encoding="utf-8")
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_gateway_unit_outlasts_drain() -> None:
    unit = unit_settings("e2ee-gateway.service")
    environment = dict(value.split("=", 1) for value in unit["Environment"])
    drain = float(environment["GATEWAY_DRAIN_DELAY_S"]) + float(
        environment["GATEWAY_SHUTDOWN_GRACE_S"]
    )

    assert unit["KillSignal"] == ["SIGTERM"]
    assert float(unit["TimeoutStopSec"][0]) > drain
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ExecStart"][0].endswith("/e2ee-gateway")


def test_heartbeat_unit_stops_with_sigterm() -> None:
    unit = unit_settings("e2ee-heartbeat.service")

    assert unit["KillSignal"] == ["SIGTERM"]
    assert "--token-file %d/provider-token" in unit["ExecStart"][0]
    assert unit["NoNewPrivileges"] == ["yes"]


@pytest.mark.parametrize("unit", ["e2ee-gateway.service", "e2ee-heartbeat.service"])
def test_systemd_verify_accepts_unit(unit: str) -> None:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed")

    checked = subprocess.run(
        [binary, "verify", str(DEPLOY / "systemd" / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # The units name /opt/e2ee-gateway, which does not exist on a test machine.
    problems = [
        line
        for line in (checked.stdout + checked.stderr).splitlines()
        if line and "is not executable: No such file or directory" not in line
    ]

    assert problems == []


def test_readme_names_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    files = [
        p.relative_to(DEPLOY).as_posix()
        for p in DEPLOY.rglob("*")
        if p.is_file() and p.name != "README.md"
    ]
    kubernetes = [name for name in files if name.startswith("kubernetes/")]

    assert "`kubernetes/`" in readme
    for name in set(files) - set(kubernetes):
        assert f"`{name}`" in readme, name


def test_kustomize_builds_manifests() -> None:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not installed")

    # kustomize renders locally; it contacts no cluster.
    built = subprocess.run(
        [binary, "kustomize", str(DEPLOY / "kubernetes")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    kinds = [document["kind"] for document in yaml.safe_load_all(built.stdout) if document]

    assert built.returncode == 0, built.stderr
    assert sorted(kinds) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
    ]
