"""Bearer tokens of the admin listener: provider tokens (one identity each) and the admin token.

Tokens are compared with ``hmac.compare_digest`` against every configured token, so the
time taken does not reveal which token, or which prefix, matched. They are never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TokenFileError",
    "TokenStore",
    "bearer_token",
    "load_admin_token",
    "load_provider_tokens",
]


class TokenFileError(ValueError):
    """A token file is missing or malformed; the message names the file and line."""


def load_provider_tokens(path: str) -> dict[str, str]:
    """Read ``<identity> <token>`` lines and return {identity: token}.

    Blank lines and lines starting with ``#`` are ignored. Raises TokenFileError on a
    line without exactly two fields, a duplicate identity or token, or an unreadable file.
    """
    tokens: dict[str, str] = {}
    for number, line in enumerate(_read(path).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise TokenFileError(
                f"{path}:{number}: expected '<identity> <token>', got {len(fields)} fields"
            )
        identity, token = fields
        if identity in tokens:
            raise TokenFileError(f"{path}:{number}: identity {identity!r} appears twice")
        if token in tokens.values():
            raise TokenFileError(f"{path}:{number}: a token is shared by two identities")
        tokens[identity] = token
    return tokens


def load_admin_token(path: str) -> str:
    """Read the admin token: the first non-blank line of the file."""
    for line in _read(path).splitlines():
        if line.strip():
            return line.strip()
    raise TokenFileError(f"{path}: the admin token file is empty")


def load_secret(path: str) -> str:
    """Read a secret stored alone in a file, such as the upstream token."""
    return load_admin_token(path)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenFileError(f"cannot read {path}: {exc.strerror}") from exc


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """Return the token of an ``Authorization: Bearer <token>`` header, if any."""
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass(frozen=True, slots=True)
class TokenStore:
    """The provider tokens by identity and the optional admin token."""

    provider_tokens: Mapping[str, str]
    admin_token: str | None

    @property
    def registration_enabled(self) -> bool:
        return bool(self.provider_tokens)

    def provider_identity(self, token: str | None) -> str | None:
        """Return the identity whose token equals ``token``, comparing against all of them."""
        if token is None:
            return None
        supplied = token.encode()
        found = None
        for identity, expected in self.provider_tokens.items():
            if hmac.compare_digest(supplied, expected.encode()):
                found = identity
        return found

    def is_admin(self, token: str | None) -> bool:
        if token is None or self.admin_token is None:
            return False
        return hmac.compare_digest(token.encode(), self.admin_token.encode())
