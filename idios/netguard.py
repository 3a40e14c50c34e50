"""Which addresses an image fetch may connect to, checked on the address actually dialled."""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddress(OSError):
    """Raised by the resolver when every address of a host is private; aiohttp wraps it as `os_error`."""


def is_public(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses (not loopback, private, link-local, metadata, multicast...)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def literal_address(host: str) -> IPAddress | None:
    """The IP address a URL host spells, if it spells one (aiohttp connects to those without resolving)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class AddressPolicy:
    """Public addresses always; private ones only when allowed wholesale, or listed as a network or a host."""

    def __init__(self, allow_private: bool, allowlist: str = "") -> None:
        self.allow_private = allow_private
        self.networks: list[IPNetwork] = []
        self.hosts: set[str] = set()
        for item in filter(None, (part.strip() for part in allowlist.split(","))):
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.hosts.add(item.lower().rstrip("."))

    def permits_host(self, host: str) -> bool:
        return self.allow_private or host.lower().rstrip(".") in self.hosts

    def permits(self, ip: IPAddress) -> bool:
        if self.allow_private or is_public(ip):
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


class HostAllowlist:
    """The hosts images may come from (IDIOS_FETCH_HOSTS): names, `*.example.org` for every subdomain of
    example.org, or IP literals; empty allows every host. Checked on the url's host before anything is
    resolved, so a refused host costs no DNS query."""

    def __init__(self, spec: str = "") -> None:
        items = [part.strip().lower().rstrip(".") for part in spec.split(",") if part.strip()]
        self.exact = {i.strip("[]") for i in items if not i.startswith("*.")}
        self.suffixes = tuple(i[1:] for i in items if i.startswith("*."))  # ".example.org"

    def allows(self, host: str) -> bool:
        if not self.exact and not self.suffixes:
            return True
        name = host.lower().rstrip(".").strip("[]")
        return name in self.exact or name.endswith(self.suffixes)


class GuardedResolver(AbstractResolver):
    """Resolves names and drops every address the policy refuses, so the connection is pinned to checked
    addresses: aiohttp connects only to what the resolver returns, so a second DNS answer cannot slip in
    between the check and the connect."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._policy.permits_host(host):
            return results
        allowed = [r for r in results if self._policy.permits(ipaddress.ip_address(r["host"]))]
        if not allowed:
            raise BlockedAddress(f"{host} resolves only to private or reserved addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
