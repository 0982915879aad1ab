"""Value types of the provider registry.

All times are Unix seconds taken from the registry's own clock (Redis ``TIME`` for the
Redis backend, an injected clock for the memory backend), never the provider's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "SIGNING_ALGOS",
    "CompletionRecord",
    "Endpoint",
    "Heartbeat",
    "HeartbeatOutcome",
    "HeartbeatResult",
    "InvalidPublicKey",
    "ProviderEntry",
    "normalize_pubkey",
]

SIGNING_ALGOS = ("ed25519", "ecdsa")
"""Signing algorithms a provider key can belong to."""

_HEX = re.compile(r"[0-9a-f]+")
_WHITESPACE = re.compile(r"\s+")

# Hex length of a public key per signing algorithm: ed25519 keys are 32 bytes, secp256k1
# (ecdsa) keys are 64 bytes, uncompressed and without the SEC1 ``04`` prefix.
PUBKEY_HEX_LENGTH = {"ed25519": 64, "ecdsa": 128}


class InvalidPublicKey(ValueError):
    """Raised when a public key is not 64 or 128 hex characters after normalisation."""


def normalize_pubkey(raw: str) -> str:
    """Return the canonical form of a model public key.

    Whitespace is removed, hex is lowercased and the SEC1 ``04`` prefix of a
    130-character uncompressed secp256k1 key is dropped. Raises InvalidPublicKey
    when the result is not 64 (ed25519) or 128 (ecdsa) hex characters.
    """
    key = _WHITESPACE.sub("", raw).lower()
    if len(key) == 130 and key.startswith("04"):
        key = key[2:]
    if not key:
        raise InvalidPublicKey("the public key is empty")
    if _HEX.fullmatch(key) is None:
        raise InvalidPublicKey("a public key must contain hex characters only")
    if len(key) not in (64, 128):
        raise InvalidPublicKey(
            f"a public key has 64 (ed25519) or 128 (ecdsa) hex characters, got {len(key)}"
        )
    return key


def signing_algo_of(pubkey: str) -> str:
    """Return the signing algorithm that a normalised key's length implies."""
    return "ed25519" if len(pubkey) == 64 else "ecdsa"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One provider base URL serving a key, with its lease."""

    url: str
    owner: str
    instance_id: str
    registered_at: float
    last_heartbeat: float
    expires_at: float

    def is_live(self, now: float) -> bool:
        return self.expires_at > now


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    """A public key with the model it serves and the endpoints that hold it."""

    pubkey: str
    model: str
    signing_algo: str
    endpoints: tuple[Endpoint, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.signing_algo not in SIGNING_ALGOS:
            raise ValueError(f"unknown signing_algo {self.signing_algo!r}")

    def live(self, now: float) -> ProviderEntry:
        """Return a copy without the endpoints whose lease ended at or before ``now``."""
        alive = tuple(e for e in self.endpoints if e.is_live(now))
        if len(alive) == len(self.endpoints):
            return self
        return ProviderEntry(self.pubkey, self.model, self.signing_algo, alive)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A validated heartbeat: the write that registers or renews one endpoint of a key.

    ``owner`` is the identity of the provider token that sent it; ``ttl_s`` is already
    clamped by the caller.
    """

    pubkey: str
    model: str
    url: str
    signing_algo: str
    owner: str
    ttl_s: float
    instance_id: str = ""

    def __post_init__(self) -> None:
        if self.signing_algo not in SIGNING_ALGOS:
            raise ValueError(f"unknown signing_algo {self.signing_algo!r}")
        if len(self.pubkey) != PUBKEY_HEX_LENGTH[self.signing_algo]:
            raise ValueError(
                f"a {self.signing_algo} key has {PUBKEY_HEX_LENGTH[self.signing_algo]} hex "
                f"characters, got {len(self.pubkey)}"
            )
        if not self.model:
            raise ValueError("model is empty")
        if self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {self.ttl_s}")
        if " " in self.url:
            raise ValueError("url contains a space")


class HeartbeatOutcome(Enum):
    """What a heartbeat did to the registry."""

    REGISTERED = "register"
    """A new endpoint, or one whose lease had ended, became live."""
    REFRESHED = "refresh"
    """A live endpoint had its lease renewed."""
    OWNER_CONFLICT = "owner_conflict"
    """The (key, url) endpoint is live and owned by another identity; nothing written."""
    MODEL_CONFLICT = "model_conflict"
    """The key is live and bound to another model; nothing written."""
    RETIRED = "retired"
    """The sending agent instance deregistered this endpoint; nothing written."""


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    outcome: HeartbeatOutcome
    expires_at: float = 0.0
    bound_model: str = ""
    """With MODEL_CONFLICT: the model the key is bound to."""


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """The provider endpoint that served one completion, kept for signature fetches."""

    url: str
    pubkey: str
    model: str

    def to_json(self) -> dict[str, str]:
        return {"url": self.url, "pubkey": self.pubkey, "model": self.model}

    @classmethod
    def from_json(cls, value: object) -> CompletionRecord | None:
        """Decode a stored record; None when it is not an object of three strings."""
        if not isinstance(value, dict):
            return None
        url, pubkey, model = value.get("url"), value.get("pubkey"), value.get("model")
        if isinstance(url, str) and isinstance(pubkey, str) and isinstance(model, str):
            return cls(url, pubkey, model)
        return None
