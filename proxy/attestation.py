"""Registration check: does the provider's attestation report publish the key it registers?

A heartbeat names a key and a URL. Before the gateway routes that key to that URL, it
fetches ``<url>/v1/attestation/report?model=M&signing_algo=A&nonce=<random>`` and
requires the report to list the key. Three levels, from weakest to strongest:

1. The report lists the key: a leaked provider token cannot point a key at a host that
   does not publish it. It does not prove the host holds the private key.
2. The element carries ``signature``, an ed25519 signature of the nonce's UTF-8 bytes
   by that key, and it verifies: the host holds the private key now (the random nonce
   rules out a replayed report). ecdsa elements are not checked at this level.
3. ``GATEWAY_ATTESTATION_VERIFIER`` names a command that receives the report on stdin
   and the nonce, key, model and algorithm as arguments, and must exit 0; deployments
   use it to verify TEE quotes. Only this level says anything about the TEE.

A (key, url) that passed is checked again after ``recheck_interval_s``. When the report
cannot be fetched at a recheck, the endpoint keeps its lease and a warning is logged;
when it no longer lists the key, the heartbeat is rejected and the lease runs out.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shlex
import time
from dataclasses import dataclass

import aiohttp
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from registry.types import InvalidPublicKey, normalize_pubkey

__all__ = ["AttestationChecker", "AttestationFailed"]

logger = logging.getLogger(__name__)

_REPORT_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=5)
_VERIFIER_TIMEOUT_S = 30.0
_MAX_REPORT_BYTES = 4 * 1024 * 1024


class AttestationFailed(Exception):
    """The key could not be confirmed; ``reachable`` is False when no report was fetched."""

    def __init__(self, message: str, *, reachable: bool) -> None:
        super().__init__(message)
        self.reachable = reachable


@dataclass(frozen=True, slots=True)
class _Checked:
    at: float


class AttestationChecker:
    """Confirms keys against provider reports and remembers which (key, url) passed."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        verifier: str | None,
        recheck_interval_s: float = 300.0,
        max_entries: int = 100_000,
    ) -> None:
        self._session = session
        self._verifier = shlex.split(verifier) if verifier else None
        self._recheck_interval_s = recheck_interval_s
        self._max_entries = max_entries
        self._passed: dict[tuple[str, str], _Checked] = {}

    async def check(self, pubkey: str, url: str, model: str, signing_algo: str) -> None:
        """Return when the key is confirmed for the URL; raise AttestationFailed otherwise.

        A recheck that cannot fetch the report keeps the earlier result.
        """
        key = (pubkey, url)
        previous = self._passed.get(key)
        now = time.monotonic()
        if previous is not None and now - previous.at < self._recheck_interval_s:
            return
        try:
            await self._confirm(pubkey, url, model, signing_algo)
        except AttestationFailed as exc:
            if previous is not None and not exc.reachable:
                logger.warning(
                    "recheck of key %s... at %s failed, keeping it: %s", pubkey[:16], url, exc
                )
                return
            self._passed.pop(key, None)
            raise
        if len(self._passed) >= self._max_entries:
            self._passed.clear()
        self._passed[key] = _Checked(now)

    def forget(self, pubkey: str, url: str | None = None) -> None:
        """Drop remembered results of a key (one URL, or all), e.g. after deregistration."""
        for key in [k for k in self._passed if k[0] == pubkey and url in (None, k[1])]:
            del self._passed[key]

    async def _confirm(self, pubkey: str, url: str, model: str, signing_algo: str) -> None:
        nonce = secrets.token_hex(32)
        raw = await self._fetch(url, model, signing_algo, nonce)
        try:
            report = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise AttestationFailed(f"the report is not JSON: {exc}", reachable=True) from None

        element = _find_element(report, pubkey)
        if element is None:
            raise AttestationFailed(
                f"the attestation report of {url} does not list key {pubkey[:16]}... for "
                f"model {model!r} and signing_algo {signing_algo}",
                reachable=True,
            )
        _check_signature(element, pubkey, signing_algo, nonce)
        if self._verifier is not None:
            await self._run_verifier(raw, nonce, pubkey, model, signing_algo)

    async def _fetch(self, url: str, model: str, signing_algo: str, nonce: str) -> bytes:
        params = {"model": model, "signing_algo": signing_algo, "nonce": nonce}
        try:
            async with self._session.get(
                url + "/v1/attestation/report", params=params, timeout=_REPORT_TIMEOUT
            ) as response:
                if response.status != 200:
                    raise AttestationFailed(
                        f"GET {url}/v1/attestation/report returned status {response.status}",
                        reachable=False,
                    )
                raw = await response.content.read(_MAX_REPORT_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AttestationFailed(
                f"cannot fetch the attestation report of {url}: {type(exc).__name__}: {exc}",
                reachable=False,
            ) from exc
        if len(raw) > _MAX_REPORT_BYTES:
            raise AttestationFailed("the attestation report is over 4 MiB", reachable=True)
        return raw

    async def _run_verifier(
        self, report: bytes, nonce: str, pubkey: str, model: str, signing_algo: str
    ) -> None:
        assert self._verifier is not None
        process = await asyncio.create_subprocess_exec(
            *self._verifier,
            nonce,
            pubkey,
            model,
            signing_algo,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(_VERIFIER_TIMEOUT_S):
                _, stderr = await process.communicate(report)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AttestationFailed(
                f"the attestation verifier did not finish within {_VERIFIER_TIMEOUT_S:.0f} s",
                reachable=True,
            ) from None
        if process.returncode != 0:
            reason = stderr.decode(errors="replace").strip().splitlines()[:1]
            raise AttestationFailed(
                f"the attestation verifier rejected the report (exit {process.returncode})"
                + (f": {reason[0][:200]}" if reason else ""),
                reachable=True,
            )


def _find_element(report: object, pubkey: str) -> dict[str, object] | None:
    """Return the report element whose ``signing_public_key`` is ``pubkey``, if any."""
    if not isinstance(report, dict):
        return None
    candidates = report.get("model_attestations")
    elements = list(candidates) if isinstance(candidates, list) else []
    elements.append(report)  # single-attestation reports carry the key at the top level
    for element in elements:
        if not isinstance(element, dict):
            continue
        published = element.get("signing_public_key")
        if not isinstance(published, str):
            continue
        try:
            if normalize_pubkey(published) == pubkey:
                return element
        except InvalidPublicKey:
            continue
    return None


def _check_signature(
    element: dict[str, object], pubkey: str, signing_algo: str, nonce: str
) -> None:
    signature = element.get("signature")
    if signature is None or signing_algo != "ed25519":
        return
    if element.get("nonce") not in (None, nonce):
        raise AttestationFailed(
            "the report signs another nonce than the one requested (a replayed report?)",
            reachable=True,
        )
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(pubkey)).verify(
            bytes.fromhex(str(signature)), nonce.encode()
        )
    except (InvalidSignature, ValueError):
        raise AttestationFailed(
            "the report's signature of the nonce does not verify with the key", reachable=True
        ) from None
