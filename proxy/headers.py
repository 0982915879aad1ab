"""Header rules of the relay: E2EE header validation and what crosses the gateway.

Pure functions with no I/O. Hop-by-hop headers follow RFC 9110 §7.6.1: the fixed set
below plus every header named in ``Connection``. They describe one connection, so they
are never forwarded in either direction.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence

from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.errors import InvalidHeader
from registry.types import InvalidPublicKey, normalize_pubkey

__all__ = [
    "E2eeHeaders",
    "client_request_id",
    "filter_response_headers",
    "upstream_request_headers",
    "validate_e2ee_headers",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MODEL_PUB_KEY = istr("X-Model-Pub-Key")
CLIENT_PUB_KEY = istr("X-Client-Pub-Key")
SIGNING_ALGO = istr("X-Signing-Algo")
ENCRYPTION_VERSION = istr("X-Encryption-Version")
REQUEST_ID = istr("X-Request-Id")
FORWARDED_FOR = istr("X-Forwarded-For")
FORWARDED_PROTO = istr("X-Forwarded-Proto")

# Header names are stored and compared lowercased: istr makes a CIMultiDict lookup
# case-insensitive, but a set of istr compares like plain str, case-sensitively.
HOP_BY_HOP = frozenset(
    name.lower()
    for name in (
        "Connection",
        "Proxy-Connection",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)

# Request headers that never reach a provider, on top of the hop-by-hop set. The
# gateway sets Host, Content-Length, X-Forwarded-* and Accept-Encoding itself, and the
# client's Authorization is replaced by the configured upstream token, if any. The
# gateway handles Expect itself and has read the whole body before it connects.
# Forwarding "100-continue" would make aiohttp hold the body back until the provider
# sends 100 Continue, which not every provider does (RFC 9110 §10.1.1).
_REQUEST_DROPPED = HOP_BY_HOP | {
    name.lower()
    for name in (
        "Host",
        "Content-Length",
        "Expect",
        "Proxy-Authorization",
        "Authorization",
        "Accept-Encoding",
        "X-Model-Pub-Key",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Request-Id",
    )
}

# Response headers that aiohttp regenerates for the client's connection.
_RESPONSE_DROPPED = HOP_BY_HOP | {"content-length", "proxy-authenticate"}

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_CLIENT_KEY_LENGTHS = {"ed25519": (64,), "ecdsa": (128, 130)}
_HEX = re.compile(r"[0-9a-fA-F]+")


class E2eeHeaders:
    """The validated E2EE headers of a client request."""

    __slots__ = ("model_pubkey", "signing_algo")

    def __init__(self, model_pubkey: str | None, signing_algo: str | None) -> None:
        self.model_pubkey = model_pubkey
        self.signing_algo = signing_algo


def validate_e2ee_headers(headers: Mapping[str, str]) -> E2eeHeaders:
    """Validate the E2EE headers and return the normalised model key, if one is pinned.

    Raises InvalidHeader, naming the header, when a key is not hex of the right length,
    the signing algorithm is unknown or contradicts a key's length, the client key and
    the algorithm do not come together, or the encryption version is not 1 or 2.
    """
    algo = headers.get(SIGNING_ALGO)
    if algo is not None:
        algo = algo.strip().lower()
        if algo not in _CLIENT_KEY_LENGTHS:
            raise InvalidHeader(
                "X-Signing-Algo",
                f"X-Signing-Algo must be 'ed25519' or 'ecdsa', got {_excerpt(algo)!r}.",
            )

    client_key = headers.get(CLIENT_PUB_KEY)
    if (client_key is None) != (algo is None):
        present, missing = (
            ("X-Client-Pub-Key", "X-Signing-Algo")
            if algo is None
            else ("X-Signing-Algo", "X-Client-Pub-Key")
        )
        raise InvalidHeader(missing, f"{present} requires {missing}: send both headers or neither.")
    if client_key is not None and algo is not None:
        _validate_client_key(client_key.strip(), algo)

    version = headers.get(ENCRYPTION_VERSION)
    if version is not None and version.strip() not in ("1", "2"):
        raise InvalidHeader(
            "X-Encryption-Version",
            f"X-Encryption-Version must be 1 or 2, got {_excerpt(version)!r}.",
        )

    raw_key = headers.get(MODEL_PUB_KEY)
    if raw_key is None:
        return E2eeHeaders(None, algo)
    try:
        model_key = normalize_pubkey(raw_key)
    except InvalidPublicKey as exc:
        raise InvalidHeader(
            "X-Model-Pub-Key",
            f"Invalid X-Model-Pub-Key: {exc}. Send the signing_public_key from the "
            "model's attestation report.",
        ) from None
    key_algo = "ed25519" if len(model_key) == 64 else "ecdsa"
    if algo is not None and algo != key_algo:
        raise InvalidHeader(
            "X-Signing-Algo",
            f"X-Signing-Algo is {algo!r} but X-Model-Pub-Key has the length of a "
            f"{key_algo} key ({len(model_key)} hex characters).",
        )
    return E2eeHeaders(model_key, algo)


def _validate_client_key(key: str, algo: str) -> None:
    lengths = _CLIENT_KEY_LENGTHS[algo]
    if _HEX.fullmatch(key) is None or len(key) not in lengths:
        expected = " or ".join(str(n) for n in lengths)
        raise InvalidHeader(
            "X-Client-Pub-Key",
            f"X-Client-Pub-Key must be {expected} hex characters for {algo}, "
            f"got {len(key)} characters.",
        )
    if len(key) == 130 and not key.startswith("04"):
        raise InvalidHeader(
            "X-Client-Pub-Key",
            "A 130-character X-Client-Pub-Key must start with 04 (an uncompressed point).",
        )


def _excerpt(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


_REQUEST_ID_PREFIX = secrets.token_hex(8)
_request_counter = itertools.count(1)


def client_request_id(headers: Mapping[str, str]) -> str:
    """Return the client's X-Request-Id if it is 1-128 of A-Za-z0-9._:-, else a new random id."""
    given = headers.get(REQUEST_ID)
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    # A random per-process prefix and a counter: unique across processes without a
    # getrandom() call per request. Request ids are labels, not secrets.
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):016x}"


def _connection_tokens(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    values: Iterable[str]
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        values = headers.getall("Connection", ())
    else:
        one = headers.get("Connection")
        values = () if one is None else (one,)
    tokens = (token.strip() for value in values for token in value.split(","))
    return {token.lower() for token in tokens if token}


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    peer: str | None,
    scheme: str,
    request_id: str,
    trusted_proxies: Sequence[IPNetwork],
    upstream_token: str | None,
) -> CIMultiDict[str]:
    """Build the headers sent to a provider from the client's request headers."""
    dropped = _REQUEST_DROPPED | _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in dropped:
            out.add(name, value)

    forwarded = _forwarded_for(headers.getall(FORWARDED_FOR, ()), peer, trusted_proxies)
    if forwarded:
        out[FORWARDED_FOR] = forwarded
        out[FORWARDED_PROTO] = scheme
    out[REQUEST_ID] = request_id
    out[istr("Accept-Encoding")] = "identity"
    if upstream_token:
        out[istr("Authorization")] = f"Bearer {upstream_token}"
    return out


def _forwarded_for(
    received: Sequence[str], peer: str | None, trusted_proxies: Sequence[IPNetwork]
) -> str:
    """Return X-Forwarded-For for the provider: kept and appended from a trusted proxy only."""
    if peer is None:
        return ", ".join(received)
    if received and _is_trusted(peer, trusted_proxies):
        return ", ".join([*received, peer])
    return peer


def _is_trusted(peer: str, trusted_proxies: Sequence[IPNetwork]) -> bool:
    if not trusted_proxies:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted_proxies)


def filter_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Return the provider's response headers that may reach the client.

    Content-Length and Transfer-Encoding are dropped because aiohttp frames the
    client's response itself: exactly one framing reaches the client.
    """
    dropped = _RESPONSE_DROPPED | _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in dropped:
            out.add(name, value)
    return out
