"""Validation of provider URLs, at registration and again on the resolved address at connect time.

Without an allow-list, any host is accepted except loopback, link-local (which holds the
cloud metadata address 169.254.169.254), unspecified and multicast addresses, and the
name ``localhost``. With an allow-list (CIDRs and host names), only those are accepted.
Registration never connects or resolves. At connect time the same policy applies to
every address a host name resolves to: ``proxy.upstream`` checks them for forwarded
requests, and ``GuardedResolver`` for aiohttp's session (attestation report fetches).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

__all__ = ["AddressPolicy", "ForbiddenAddress", "GuardedResolver", "InvalidProviderUrl"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class InvalidProviderUrl(ValueError):
    """A provider URL is malformed or points where providers may not be."""


class ForbiddenAddress(OSError):
    """A provider host name resolved only to addresses the policy forbids."""


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which provider hosts the gateway may forward to."""

    networks: tuple[IPNetwork, ...] = ()
    host_names: frozenset[str] = frozenset()

    @classmethod
    def from_allow_list(cls, entries: Sequence[str]) -> AddressPolicy:
        """Build the policy from GATEWAY_ALLOWED_PROVIDER_HOSTS entries (empty: default deny)."""
        networks: list[IPNetwork] = []
        names: set[str] = set()
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry.lower().rstrip("."))
        return cls(tuple(networks), frozenset(names))

    @property
    def has_allow_list(self) -> bool:
        return bool(self.networks or self.host_names)

    def allows_address(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if self.has_allow_list:
            return any(address in network for network in self.networks)
        return not (
            address.is_loopback
            or address.is_link_local
            or address.is_unspecified
            or address.is_multicast
        )

    def allowed_addresses(self, host: str, addresses: Sequence[str]) -> list[str]:
        """Return those of ``host``'s ``addresses`` the policy allows, or raise ForbiddenAddress."""
        allowed = [
            address for address in addresses if self.allows_address(ipaddress.ip_address(address))
        ]
        if not allowed:
            raise ForbiddenAddress(f"provider host {host!r} resolves only to forbidden addresses")
        return allowed

    def allows_host_name(self, name: str) -> bool:
        """Return whether a host name may be registered; its addresses are checked later."""
        name = name.lower().rstrip(".")
        if self.has_allow_list:
            return name in self.host_names
        return name != "localhost" and not name.endswith(".localhost")

    def validate_url(self, raw: str) -> str:
        """Return the provider base URL without a trailing slash, or raise InvalidProviderUrl."""
        try:
            url = URL(raw)
        # yarl 1.25 raises IndexError for brackets before an empty host, such as
        # "http://[::1]@" (https://github.com/aio-libs/yarl/issues/1822).
        except (ValueError, TypeError, IndexError) as exc:
            raise InvalidProviderUrl(f"url is not a valid URL: {exc}") from exc
        if url.scheme not in ("http", "https"):
            raise InvalidProviderUrl(f"url must use http or https, got scheme {url.scheme!r}")
        if not url.host:
            raise InvalidProviderUrl("url has no host")
        if url.user is not None or url.password is not None:
            raise InvalidProviderUrl("url must not contain credentials")
        if url.query_string or url.fragment:
            raise InvalidProviderUrl("url must not have a query or fragment")

        host = url.host
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if not self.allows_host_name(host):
                raise InvalidProviderUrl(self._rejection(host)) from None
        else:
            if not self.allows_address(address):
                raise InvalidProviderUrl(self._rejection(host))
        return str(url).rstrip("/")

    def _rejection(self, host: str) -> str:
        if self.has_allow_list:
            return (
                f"provider host {host!r} is not in GATEWAY_ALLOWED_PROVIDER_HOSTS; "
                "ask the gateway operator to add it"
            )
        return (
            f"provider host {host!r} is a loopback, link-local, unspecified or multicast "
            "address; set GATEWAY_ALLOWED_PROVIDER_HOSTS to allow it explicitly"
        )


class GuardedResolver(AbstractResolver):
    """Resolver that drops every address the policy forbids before aiohttp connects."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = set(self._policy.allowed_addresses(host, [r["host"] for r in results]))
        return [r for r in results if r["host"] in allowed]

    async def close(self) -> None:
        await self._inner.close()
