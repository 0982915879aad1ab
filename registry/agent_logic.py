"""Pure decisions of the heartbeat agent: settings, delays, report parsing, key changes.

Nothing here does I/O, so each rule is unit-tested without servers; ``registry.agent``
runs the loop that applies them.
"""

from __future__ import annotations

import argparse
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

import orjson

from registry.types import (
    PUBKEY_HEX_LENGTH,
    SIGNING_ALGOS,
    InvalidPublicKey,
    normalize_pubkey,
    signing_algo_of,
)

__all__ = [
    "AgentConfig",
    "BeatOutcome",
    "KeyChange",
    "ReportError",
    "backoff_cap_s",
    "backoff_s",
    "classify_beat_status",
    "config_from_args",
    "diff_keys",
    "error_message",
    "jittered_s",
    "key_prefix",
    "parse_args",
    "parse_report_key",
]

REPORT_PATH = "/v1/attestation/report"
_MESSAGE_CHARS = 200


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Settings of one heartbeat agent; durations in seconds.

    With ``pubkey`` the agent heartbeats that one key, for the single algorithm in
    ``signing_algos`` (inferred from the key's length when left at the default).
    Without it, the keys come from the provider's attestation report, one per algorithm.
    ``report_url`` is the base URL for ``/health`` and the report; it defaults to
    ``provider_url``, the base URL registered with the gateway.
    """

    gateway_url: str
    token: str = field(repr=False)
    model: str
    provider_url: str
    report_url: str | None = None
    pubkey: str | None = None
    signing_algos: tuple[str, ...] = SIGNING_ALGOS
    ttl_s: float = 30.0
    report_interval_s: float = 60.0
    health_path: str = "/health"
    request_timeout_s: float = 5.0
    report_timeout_s: float = 30.0
    backoff_base_s: float = 0.5
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        for name in ("gateway_url", "provider_url", "report_url"):
            value = getattr(self, name)
            if value is None:
                continue
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{name} must be an http(s) URL with a host, got {value!r}")
        if not self.token:
            raise ValueError("the provider token is empty")
        if not self.model:
            raise ValueError("model is empty")
        unknown = [algo for algo in self.signing_algos if algo not in SIGNING_ALGOS]
        if unknown or not self.signing_algos:
            raise ValueError(f"signing_algos must be a non-empty subset of {SIGNING_ALGOS}")
        for name in ("ttl_s", "report_interval_s", "request_timeout_s", "report_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.health_path.startswith("/"):
            raise ValueError(f"health_path must start with '/', got {self.health_path!r}")
        if self.pubkey is not None:
            self._check_pubkey(self.pubkey)

    def _check_pubkey(self, raw: str) -> None:
        key = normalize_pubkey(raw)
        if self.signing_algos == SIGNING_ALGOS:
            # Frozen: the inferred algorithm replaces the default through object.__setattr__.
            object.__setattr__(self, "signing_algos", (signing_algo_of(key),))
        elif len(self.signing_algos) != 1:
            raise ValueError("with a pubkey, give at most one signing algorithm")
        elif len(key) != PUBKEY_HEX_LENGTH[self.signing_algos[0]]:
            raise InvalidPublicKey(
                f"a {self.signing_algos[0]} key has {PUBKEY_HEX_LENGTH[self.signing_algos[0]]}"
                f" hex characters, got {len(key)}"
            )
        object.__setattr__(self, "pubkey", key)

    @property
    def endpoint(self) -> str:
        """The provider base URL sent in heartbeats, without a trailing slash."""
        return self.provider_url.rstrip("/")

    @property
    def heartbeat_url(self) -> str:
        return self.gateway_url.rstrip("/") + "/v1/providers/heartbeat"

    def deregister_url(self, pubkey: str) -> str:
        query = urlencode({"url": self.endpoint})
        return f"{self.gateway_url.rstrip('/')}/v1/providers/{quote(pubkey)}?{query}"

    @property
    def health_url(self) -> str:
        return (self.report_url or self.provider_url).rstrip("/") + self.health_path

    def report_request_url(self, algo: str) -> str:
        query = urlencode({"model": self.model, "signing_algo": algo})
        return f"{(self.report_url or self.provider_url).rstrip('/')}{REPORT_PATH}?{query}"


class ReportError(ValueError):
    """The attestation report is malformed or contains an invalid key."""


class BeatOutcome(Enum):
    """The agent's handling of the gateway's response to one heartbeat."""

    OK = "ok"
    """200: the entry is live until the next heartbeat is due."""
    TRANSIENT = "transient"
    """Unreachable, timed out, 429 or 5xx: retry soon with backoff."""
    REJECTED = "rejected"
    """400, 401, 409 or another 4xx: a configuration fault, retried at the normal interval."""
    RETIRED = "retired"
    """410: this instance deregistered the entry; stop heartbeating the key."""


def classify_beat_status(status: int) -> BeatOutcome:
    """Return how to treat a heartbeat response with HTTP ``status``."""
    if 200 <= status < 300:
        return BeatOutcome.OK
    if status == 410:
        return BeatOutcome.RETIRED
    if status >= 500 or status == 429:
        return BeatOutcome.TRANSIENT
    return BeatOutcome.REJECTED


def jittered_s(interval_s: float, rand: Callable[[], float], fraction: float = 0.1) -> float:
    """Return ``interval_s`` moved by up to ``fraction`` of it either way.

    Jitter keeps agents that started together from heartbeating in lockstep.
    ``rand`` returns a float in [0, 1), like ``random.random``.
    """
    return interval_s * (1 + fraction * (2 * rand() - 1))


def backoff_cap_s(interval_s: float, ttl_s: float) -> float:
    """Return the longest wait between retries: the interval, but never more than ttl/3.

    A live entry expires ttl_s after its last successful heartbeat. Because each retry
    waits at most ttl/3, the first attempt after a gateway outage comes within ttl/3 of
    its end. The first failed heartbeat is due up to 0.37 x ttl_s after the last success
    (interval ttl/3 plus 10% jitter), so an outage shorter than about 0.3 x ttl_s never
    lets a live entry expire.
    """
    return min(interval_s, ttl_s / 3)


def backoff_s(failures: int, *, base_s: float, cap_s: float, rand: Callable[[], float]) -> float:
    """Return the wait before retry number ``failures`` (1 = the first retry).

    Exponential backoff with full jitter: uniform in [0, min(cap_s, base_s * 2**(failures-1))].
    """
    exponent = min(max(failures, 1) - 1, 30)
    return rand() * min(cap_s, base_s * math.pow(2, exponent))


def parse_report_key(report: object, model: str, algo: str) -> str | None:
    """Return the normalised ``algo`` key of ``model`` in an attestation report, or None.

    The report is the decoded JSON of ``GET /v1/attestation/report``; keys come from
    ``model_attestations[].signing_public_key``. An element naming another model is
    skipped. Returns None when no element has that algorithm (the provider does not offer
    it). Raises ReportError when the report is malformed or the key is invalid.
    """
    if not isinstance(report, dict):
        raise ReportError("the attestation report is not a JSON object")
    attestations = report.get("model_attestations")
    if not isinstance(attestations, list):
        raise ReportError("the attestation report has no 'model_attestations' list")

    for element in attestations:
        if not isinstance(element, dict) or element.get("signing_algo") != algo:
            continue
        if element.get("model", model) != model:
            continue
        raw = element.get("signing_public_key")
        if not isinstance(raw, str):
            raise ReportError(f"the {algo} attestation has no string 'signing_public_key'")
        try:
            key = normalize_pubkey(raw)
        except InvalidPublicKey as exc:
            raise ReportError(f"the {algo} attestation has an invalid key: {exc}") from exc
        if len(key) != PUBKEY_HEX_LENGTH[algo]:
            raise ReportError(
                f"the {algo} attestation key has {len(key)} hex characters, "
                f"expected {PUBKEY_HEX_LENGTH[algo]}"
            )
        return key
    return None


@dataclass(frozen=True, slots=True)
class KeyChange:
    """A change of one algorithm's key between two reads of the report."""

    algo: str
    old: str | None
    """The key to deregister, or None when the algorithm is new."""
    new: str | None
    """The key to register, or None when the provider stopped offering the algorithm."""


def diff_keys(old: Mapping[str, str], new: Mapping[str, str]) -> list[KeyChange]:
    """Return the changes from ``old`` to ``new`` (both algorithm to key), by algorithm."""
    changes = []
    for algo in sorted(old.keys() | new.keys()):
        before, after = old.get(algo), new.get(algo)
        if before != after:
            changes.append(KeyChange(algo, before, after))
    return changes


def error_message(body: bytes) -> str:
    """Return the ``error.message`` of an error envelope, cut to 200 characters.

    Falls back to a placeholder when the body is not an envelope; the raw body is
    never returned, so it never reaches a log.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "(no error message)"
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return "(no error message)"
    return message[:_MESSAGE_CHARS]


def key_prefix(pubkey: str) -> str:
    """Return the first 16 hex characters of a key: enough to tell keys apart in logs."""
    return pubkey[:16]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the ``e2ee-heartbeat`` command line."""
    parser = argparse.ArgumentParser(
        prog="e2ee-heartbeat",
        description="Keep a provider's public keys registered with an e2ee gateway.",
    )
    parser.add_argument("--gateway", required=True, help="the gateway's admin base URL")
    parser.add_argument(
        "--token-file", required=True, type=Path, help="file with the provider token on one line"
    )
    parser.add_argument("--model", required=True, help="the model the provider serves")
    parser.add_argument(
        "--provider-url", required=True, help="the provider's base URL that the gateway calls"
    )
    parser.add_argument(
        "--report-url",
        default=None,
        help="base URL for /health and the report (default: --provider-url)",
    )
    parser.add_argument("--pubkey", default=None, help="heartbeat this one key, not the report's")
    parser.add_argument(
        "--signing-algo",
        default=None,
        help="comma-separated algorithms to read from the report (default: ed25519,ecdsa); "
        "with --pubkey, the key's algorithm (default: from its length)",
    )
    parser.add_argument("--ttl-s", type=float, default=30.0, help="entry TTL requested, seconds")
    parser.add_argument(
        "--report-interval-s", type=float, default=60.0, help="seconds between report reads"
    )
    parser.add_argument("--health-path", default="/health", help="the provider's health path")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Build the agent config; raise ValueError or OSError naming what is wrong."""
    lines = [line.strip() for line in args.token_file.read_text().splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"the token file {args.token_file} must contain one non-empty line")
    token = lines[0]
    algos = SIGNING_ALGOS
    if args.signing_algo is not None:
        algos = tuple(a.strip() for a in args.signing_algo.split(",") if a.strip())
        if args.pubkey is not None and len(algos) != 1:
            raise ValueError("--pubkey takes a single --signing-algo")
    return AgentConfig(
        gateway_url=args.gateway,
        token=token,
        model=args.model,
        provider_url=args.provider_url,
        report_url=args.report_url,
        pubkey=args.pubkey,
        signing_algos=algos,
        ttl_s=args.ttl_s,
        report_interval_s=args.report_interval_s,
        health_path=args.health_path,
    )
