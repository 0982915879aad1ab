"""Client of a running gateway's admin API, for the ``e2ee-registry --gateway`` mode.

It offers what the admin API offers: the stored entries (``GET /v1/providers``) and
eviction (``DELETE /v1/providers/{key}?url=``), with the admin token. This works with
every registry the gateway runs, ``memory://`` included; there is no event stream and
no way to run the reaper through it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from registry.base import DeregisterForbidden, KeyNotFound, RegistryError, RegistryUnavailable
from registry.types import Endpoint, ProviderEntry

__all__ = ["GatewayAdminClient", "read_token_file"]


def read_token_file(path: str) -> str:
    """Return the token on the file's first non-blank line; raise ValueError if none."""
    try:
        with open(path, encoding="utf-8") as token_file:
            lines = [line.strip() for line in token_file]
    except OSError as exc:
        raise ValueError(f"cannot read the admin token file {path}: {exc.strerror}") from None
    token = next((line for line in lines if line), "")
    if not token:
        raise ValueError(f"the admin token file {path} is empty")
    return token


def _entry(item: dict[str, Any]) -> ProviderEntry:
    endpoints = tuple(
        Endpoint(
            url=str(e["url"]),
            owner=str(e["owner"]),
            instance_id=str(e["instance_id"]),
            registered_at=float(e["registered_at"]),
            last_heartbeat=float(e["last_heartbeat"]),
            expires_at=float(e["expires_at"]),
        )
        for e in item["endpoints"]
    )
    return ProviderEntry(
        str(item["pubkey"]), str(item["model"]), str(item["signing_algo"]), endpoints
    )


def _error_message(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


class GatewayAdminClient:
    """The admin API at ``base_url`` (the gateway's admin listener), used with ``token``.

    Each call is bounded by ``timeout_s``. Errors map to the registry's: unreachable
    gateway or 503 → RegistryUnavailable, 404 → KeyNotFound, 403 → DeregisterForbidden,
    anything else that is not a success → RegistryError. The token is never printed.
    """

    def __init__(self, base_url: str, token: str, *, timeout_s: float) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            headers=self._headers,
        )
        self._now: float | None = None

    async def entries(self) -> list[ProviderEntry]:
        """Return every entry as the gateway's registry stores it, sorted by key."""
        body = await self._request("GET", "/v1/providers")
        try:
            document = orjson.loads(body)
            self._now = float(document["now"])
            entries = [_entry(item) for item in document["data"]]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"invalid response from GET /v1/providers: {exc!r}") from exc
        return sorted(entries, key=lambda e: e.pubkey)

    async def now(self) -> float:
        """Return the registry clock as of the last listing (listing again if there was none)."""
        if self._now is None:
            await self.entries()
        assert self._now is not None
        return self._now

    async def deregister(self, pubkey: str, *, url: str | None, identity: str | None) -> list[str]:
        """Evict endpoints of a key as the admin; return the URLs that were listed for it.

        The admin API responds 204 without naming what it removed, so without ``url`` the
        result is the key's endpoints as listed just before the DELETE. ``identity`` must
        be None: this client acts as the admin only.
        """
        if identity is not None:
            raise ValueError("the admin API evicts as the admin only")
        if url is not None:
            targets = [url]
        else:
            entry = next((e for e in await self.entries() if e.pubkey == pubkey), None)
            targets = [e.url for e in entry.endpoints] if entry is not None else []
        path = f"/v1/providers/{quote(pubkey, safe='')}"
        params = {"url": url} if url is not None else None
        await self._request("DELETE", path, params=params)
        return targets

    async def aclose(self) -> None:
        await self._session.close()

    async def _request(
        self, method: str, path: str, *, params: dict[str, str] | None = None
    ) -> bytes:
        where = f"{method} {self._base_url}{path}"
        try:
            async with self._session.request(
                method, self._base_url + path, params=params
            ) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistryUnavailable(f"{where} failed: {exc!r}") from exc

        if status < 300:
            return body
        message = f"{where}: HTTP {status}: {_error_message(body)}"
        if status == 404:
            raise KeyNotFound(message)
        if status == 403:
            raise DeregisterForbidden(message)
        if status == 503:
            raise RegistryUnavailable(message)
        raise RegistryError(message)
