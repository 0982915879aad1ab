"""Gateway settings, read once at start from ``GATEWAY_*`` environment variables.

Every field maps to one variable: ``connect_timeout_s`` is ``GATEWAY_CONNECT_TIMEOUT_S``
and the ``--connect-timeout-s`` flag of ``e2ee-gateway``. Durations are seconds. A bad
value raises ConfigError naming the variable, so the process fails at start.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigError", "Settings", "env_name"]

ENV_PREFIX = "GATEWAY_"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_WORKERS = 64
"""Upper bound of ``GATEWAY_WORKERS``. Each worker keeps its own snapshot and connections."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable."""


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected on/off, true/false or 1/0, got {raw!r}")


def _parse_networks(raw: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in _split(raw))


def _split(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"a port is 0-65535, got {value}")
    return value


def _duration(raw: str) -> float:
    return _positive(float(raw))


def _non_negative_duration(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def _count(raw: str) -> int:
    return int(_positive(int(raw)))


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_none(raw: str) -> Any:
        return None if raw.strip() == "" else parse(raw)

    return parse_or_none


def _setting(default: Any, parse: Callable[[str], Any], help: str) -> Any:
    return dataclasses.field(default=default, metadata={"parse": parse, "help": help})


@dataclass(frozen=True, slots=True)
class Settings:
    """The gateway's configuration; build it with ``Settings.from_env``."""

    registry_url: str = _setting(
        "memory://",
        str,
        "registry URL: memory://, redis://, rediss://, redis+sentinel://host:port[,...]/service",
    )
    redis_prefix: str = _setting("e2ee", str, "prefix of every Redis key")
    redis_timeout_s: float = _setting(0.5, _duration, "Redis connect and command timeout")
    registry_outage_grace_s: float = _setting(
        60.0, _duration, "how long a replica keeps serving its snapshot while Redis is down"
    )
    reap_interval_s: float = _setting(1.0, _duration, "period of the expired-endpoint reaper")

    host: str = _setting("127.0.0.1", str, "public listener address")
    port: int = _setting(8080, _port, "public listener port")
    admin_host: str = _setting("127.0.0.1", str, "admin listener address")
    admin_port: int = _setting(9090, _port, "admin listener port")

    provider_tokens_file: str | None = _setting(
        None, _optional(str), "file of '<identity> <token>' lines; unset disables registration"
    )
    admin_token_file: str | None = _setting(None, _optional(str), "file with the admin token")
    client_keys_file: str | None = _setting(None, _optional(str), "file of client API keys")
    upstream_token_file: str | None = _setting(
        None, _optional(str), "file with the bearer token sent to providers"
    )
    allowed_provider_hosts: tuple[str, ...] = _setting(
        (), _split, "comma-separated CIDRs and host names that provider URLs may use"
    )
    trusted_proxies: tuple[IPNetwork, ...] = _setting(
        (), _parse_networks, "comma-separated CIDRs whose X-Forwarded-For is kept"
    )

    heartbeat_ttl_s: float = _setting(30.0, _duration, "default endpoint lease")
    heartbeat_ttl_min_s: float = _setting(5.0, _duration, "shortest lease a heartbeat gets")
    heartbeat_ttl_max_s: float = _setting(300.0, _duration, "longest lease a heartbeat gets")

    connect_timeout_s: float = _setting(5.0, _duration, "upstream connect timeout")
    first_byte_timeout_s: float = _setting(
        120.0, _duration, "streams: wait for upstream headers and the first event"
    )
    idle_timeout_s: float = _setting(300.0, _duration, "streams: longest gap between reads")
    request_timeout_s: float = _setting(900.0, _duration, "non-streaming requests: total time")
    upstream_keepalive_s: float = _setting(
        4.0, _duration, "idle upstream connections are closed after this long"
    )
    # Every proxied stream holds two file descriptors (client and provider), so the
    # default lets one provider serve 8192 concurrent streams while a hung one cannot
    # take more than about 16k descriptors; raise the process's open-file limit to match.
    max_connections_per_provider: int = _setting(
        8192,
        _count,
        "open upstream connections per provider host and port; more requests wait in a queue",
    )
    retry_backoff_s: float = _setting(
        0.05, _duration, "first backoff between attempts on one key's providers"
    )
    eject_cooldown_s: float = _setting(
        10.0, _duration, "a failing provider stays out of unpinned balancing this long"
    )
    client_body_timeout_s: float = _setting(
        60.0, _duration, "longest gap between two reads of a client's request body"
    )
    max_body_bytes: int = _setting(32 * 1024 * 1024, _count, "largest request body accepted")

    drain_delay_s: float = _setting(
        5.0, _non_negative_duration, "serve normally this long after SIGTERM"
    )
    shutdown_grace_s: float = _setting(60.0, _duration, "streams may finish this long")
    signature_ttl_s: float = _setting(1200.0, _duration, "how long completion ids are kept")
    client_concurrency: int | None = _setting(
        None, _optional(_count), "concurrent requests per client key (needs client keys)"
    )
    auth_failure_limit: int = _setting(
        20, _count, "failed token attempts per source IP within the window before 429"
    )
    auth_failure_window_s: float = _setting(
        60.0, _duration, "window of the failed token attempt limit"
    )
    workers: int = _setting(
        1,
        _count,
        f"gateway processes sharing both ports with SO_REUSEPORT, 1-{MAX_WORKERS}; more than 1 "
        "needs a shared registry (not memory://) and fixed ports",
    )
    log_format: str = _setting("text", _choice("text", "json"), "log line format")
    log_level: str = _setting(
        "info", _choice("debug", "info", "warning", "error"), "lowest level logged"
    )
    require_attestation_match: bool = _setting(
        True, _parse_bool, "check a new key against the provider's attestation report"
    )
    attestation_recheck_s: float = _setting(
        300.0, _duration, "a registered key is checked against the report again after this long"
    )
    attestation_verifier: str | None = _setting(
        None, _optional(str), "command that verifies attestation reports"
    )

    def __post_init__(self) -> None:
        if self.heartbeat_ttl_min_s > self.heartbeat_ttl_max_s:
            raise ConfigError(
                f"{env_name('heartbeat_ttl_min_s')} ({self.heartbeat_ttl_min_s}) is above "
                f"{env_name('heartbeat_ttl_max_s')} ({self.heartbeat_ttl_max_s})"
            )
        if not self.heartbeat_ttl_min_s <= self.heartbeat_ttl_s <= self.heartbeat_ttl_max_s:
            raise ConfigError(
                f"{env_name('heartbeat_ttl_s')} ({self.heartbeat_ttl_s}) must lie between "
                f"the minimum {self.heartbeat_ttl_min_s} and the maximum {self.heartbeat_ttl_max_s}"
            )
        if self.client_concurrency is not None and self.client_keys_file is None:
            raise ConfigError(
                f"{env_name('client_concurrency')} caps requests per client key and needs "
                f"{env_name('client_keys_file')}"
            )
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(
                f"{env_name('workers')}={self.workers} is out of range: use 1 to {MAX_WORKERS}, "
                "usually one worker per CPU core"
            )
        if self.workers > 1 and self.registry_url.startswith("memory:"):
            raise ConfigError(
                f"{env_name('workers')}={self.workers} needs a shared registry: each worker "
                "would hold its own memory:// registry. Set GATEWAY_REGISTRY_URL to redis://..."
            )
        if self.workers > 1 and 0 in (self.port, self.admin_port):
            raise ConfigError(
                f"{env_name('workers')}={self.workers} needs fixed ports: with port 0 every "
                f"worker would listen on a port of its own. Set {env_name('port')} and "
                f"{env_name('admin_port')}."
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from a mapping such as ``os.environ``; unknown names are ignored."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = env_name(field.name)
            raw = env.get(name)
            if raw is None:
                continue
            try:
                values[field.name] = field.metadata["parse"](raw)
            except ValueError as exc:
                raise ConfigError(f"invalid {name}={raw!r}: {exc}") from exc
        return cls(**values)

    def clamp_ttl(self, ttl_s: float | None) -> float:
        """Return the lease for a heartbeat's requested ttl_s (the default when absent)."""
        if ttl_s is None:
            return self.heartbeat_ttl_s
        return min(max(ttl_s, self.heartbeat_ttl_min_s), self.heartbeat_ttl_max_s)


def describe(settings: Settings) -> dict[str, Any]:
    """Return the effective settings for the start-up log line, with secrets left out.

    Token files are shown by path (their content is never read here); the registry URL
    has its credentials redacted by the caller.
    """
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def flag_help() -> list[tuple[str, str, str]]:
    """Return (flag, variable, help) for every setting, for the command line parser."""
    rows = []
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(str(item) for item in default) or None
        shown = "unset" if default is None else default
        rows.append((flag, env_name(field.name), f"{field.metadata['help']}; default {shown}"))
    return rows
