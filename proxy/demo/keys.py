"""Signing keys of the demo provider: one ed25519 and one secp256k1 (ecdsa) key pair."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["SIGNING_ALGOS", "DemoKeys"]

SIGNING_ALGOS = ("ed25519", "ecdsa")

# Order of the secp256k1 group (SEC 2, section 2.4.1): a private scalar lies in [1, n - 1].
_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass(frozen=True, slots=True)
class DemoKeys:
    """The private keys a demo provider signs with, one per signing algorithm.

    Give several demo providers the same DemoKeys (or the same seed) to model replicas
    that derive one key.
    """

    ed25519: Ed25519PrivateKey
    ecdsa: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> DemoKeys:
        """Create fresh random keys."""
        return cls(Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256K1()))

    @classmethod
    def from_seed(cls, seed: bytes) -> DemoKeys:
        """Derive both keys from ``seed``, so that equal seeds give equal keys."""
        ed25519 = Ed25519PrivateKey.from_private_bytes(
            hashlib.sha256(b"demo-ed25519:" + seed).digest()
        )
        digest = hashlib.sha256(b"demo-ecdsa:" + seed).digest()
        scalar = int.from_bytes(digest, "big") % (_SECP256K1_ORDER - 1) + 1
        return cls(ed25519, ec.derive_private_key(scalar, ec.SECP256K1()))

    def public_key_hex(self, algo: str) -> str:
        """Return the public key as published in an attestation report.

        ed25519: the 32 raw bytes as 64 hex chars. ecdsa: the uncompressed SEC1 point
        without its ``04`` prefix, 128 hex chars. Raises ValueError for another algorithm.
        """
        if algo == "ed25519":
            raw = self.ed25519.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            return raw.hex()
        if algo == "ecdsa":
            point = self.ecdsa.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            return point[1:].hex()
        raise ValueError(f"unknown signing algorithm {algo!r}")

    def sign_hex(self, algo: str, data: bytes) -> str:
        """Sign ``data`` and return the signature as hex.

        ed25519: the 64-byte signature. ecdsa: a DER-encoded ECDSA signature over the
        SHA-256 of ``data``. Raises ValueError for another algorithm.
        """
        if algo == "ed25519":
            return self.ed25519.sign(data).hex()
        if algo == "ecdsa":
            return self.ecdsa.sign(data, ec.ECDSA(hashes.SHA256())).hex()
        raise ValueError(f"unknown signing algorithm {algo!r}")
