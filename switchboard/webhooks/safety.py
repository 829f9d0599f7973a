"""Where a webhook may be sent: only http(s) URLs whose host resolves to globally routable
addresses, unless configuration allows private ones (SWITCHBOARD_WEBHOOK_ALLOW_PRIVATE, for tests
and on-premises receivers). Checked at creation and again at every delivery, and a delivery
connects to the very addresses it checked: resolving again to connect would let a name answer
"public" to the check and "loopback" to the connection (DNS rebinding)."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses a connection to that host may use. Injected so tests can play a
# name server that answers differently on each call.
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT = 5.0  # getaddrinfo can hang far longer than an attempt's 10 s
ALLOW_PRIVATE_HINT = (
    "to send webhooks to private receivers (local development, on-premises), "
    "set SWITCHBOARD_WEBHOOK_ALLOW_PRIVATE=true"
)

# A host name after IDNA encoding: dot-separated labels of letters, digits, hyphens (and the
# underscores some real names carry). Anything else (spaces, percent signs, empty labels) is
# refused here rather than handed to getaddrinfo, whose reading of odd names varies by platform.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)

# NAT64's well-known prefix (RFC 6052): the translator sends on to the IPv4 address in the last
# 32 bits, so that address is the one to judge.
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
# Not globally reachable (IANA special-purpose registry), yet Python 3.11's is_global says True.
_NOT_GLOBAL = (
    ipaddress.IPv6Network("fec0::/10"),  # site-local, deprecated but still routed inside sites
    # Local-use NAT64 (RFC 8215): where the IPv4 sits depends on the operator's prefix length,
    # so it cannot be checked; and the prefix is local by definition.
    ipaddress.IPv6Network("64:ff9b:1::/48"),
    ipaddress.IPv6Network("3fff::/20"),  # documentation (RFC 9637)
)


class UnsafeUrl(ValueError):
    """The message says why, for the API's 400 and the delivery log."""


@dataclass(frozen=True)
class WebhookUrl:
    """A URL as the HTTP client reads it, with what a pinned connection needs."""

    url: httpx.URL
    host: str  # ASCII (IDNA-encoded) name or IP literal without brackets: SNI and the check
    port: int
    literal: IPAddress | None  # the host, when it is an IP address

    @property
    def host_header(self) -> str:
        """The Host header the receiver would see had we connected by name."""
        return self.url.netloc.decode("ascii")

    def at(self, address: IPAddress) -> httpx.URL:
        """The same URL aimed at one address (so the HTTP client does no resolving of its own)."""
        return self.url.copy_with(host=str(address))


def check_shape(url: str) -> WebhookUrl:
    """The URL parsed by the same parser that sends it (two parsers reading one URL differently
    is a classic way around such checks); raises UnsafeUrl for anything we would not send to."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrl(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, ValueError) as error:
        # InvalidURL: "http://[::1", "http://[zz]/", control characters; UnicodeError: a name
        # IDNA cannot encode. The parser's own words are safe to show and say what is wrong.
        raise UnsafeUrl(f"is not a valid URL ({error})") from None
    if parsed.scheme not in ("https", "http"):
        raise UnsafeUrl("must be an http:// or https:// URL")
    if parsed.userinfo:
        raise UnsafeUrl("must not carry credentials")
    if not host:
        raise UnsafeUrl("must name a host")
    port = parsed.port if parsed.port is not None else (443 if parsed.scheme == "https" else 80)
    if not 1 <= port <= 65535:
        raise UnsafeUrl("has an invalid port (1 to 65535)")
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
        if not _is_host_name(host):
            raise UnsafeUrl(f"has an invalid host name {host!r}") from None
    return WebhookUrl(parsed, host, port, literal)


def _is_host_name(host: str) -> bool:
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, for the forms whose packets end up there:
    IPv4-mapped (::ffff:0:0/96), 6to4 (2002::/16), NAT64 (64:ff9b::/96), Teredo (the client)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.teredo is not None:
        return address.teredo[1]
    return None


def is_public(address: IPAddress | str) -> bool:
    """Whether a receiver at this address is on the public internet: globally routable, unicast,
    and, for an IPv6 address that embeds an IPv4 one, that IPv4 address too."""
    ip = address if not isinstance(address, str) else ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            if not is_public(inner):
                return False
            if ip.ipv4_mapped is not None or ip in _NAT64_WELL_KNOWN:
                # The packets go to `inner` (mapped: over IPv4; NAT64: through the translator);
                # Python counts both prefixes as reserved, which says nothing about `inner`.
                return True
        if any(ip in network for network in _NOT_GLOBAL):
            return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast  # is_global is True for global-scope multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """The system's answer (getaddrinfo on the running loop): the default Resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0]) for info in infos]


async def checked_addresses(
    target: WebhookUrl, allow_private: bool, resolve: Resolver = resolve_host
) -> list[IPAddress]:
    """Resolves the host once and checks every address; a delivery connects to these and no
    others. Raises UnsafeUrl if the host does not resolve or any address may not be used."""
    if target.literal is not None:
        addresses: list[IPAddress] = [target.literal]
    else:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                answer = await resolve(target.host, target.port)
        except TimeoutError:
            message = f"host {target.host} did not resolve within {RESOLVE_TIMEOUT:g} s"
            raise UnsafeUrl(message) from None
        except (OSError, UnicodeError, ValueError):
            raise UnsafeUrl(f"host {target.host} does not resolve") from None
        addresses = list(dict.fromkeys(answer))  # without repeats, in the resolver's order
        if not addresses:
            raise UnsafeUrl(f"host {target.host} does not resolve")
    if allow_private:
        return addresses
    if not all(is_public(address) for address in addresses):
        # Names do not say which address: what an internal name server answers is not the API
        # caller's business. A literal is the caller's own input.
        subject = (
            f"{target.literal} is"
            if target.literal is not None
            else f"host {target.host} resolves to an address that is"
        )
        raise UnsafeUrl(
            f"{subject} not a public internet address (private, loopback, link-local, shared, "
            f"reserved or multicast); {ALLOW_PRIVATE_HINT}"
        )
    return addresses


async def check_url(url: str, allow_private: bool, resolve: Resolver = resolve_host) -> WebhookUrl:
    """The check at creation: the shape always, the addresses unless private ones are allowed
    (a development setup need not resolve its receivers' names yet)."""
    target = check_shape(url)
    if not allow_private:
        await checked_addresses(target, allow_private, resolve)
    return target
