"""Where a webhook may be sent: only http(s) URLs whose host resolves to public addresses,
unless configuration allows private ones (SWITCHBOARD_WEBHOOK_ALLOW_PRIVATE, for tests and
on-premises receivers). Checked at creation and again at every delivery, because DNS can change
between the two (DNS rebinding)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit


class UnsafeUrl(ValueError):
    """The message says why, for the API's 400 and the delivery log."""


def check_shape(url: str) -> tuple[str, int]:
    """(host, port) of a URL we could send to; raises UnsafeUrl otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        raise UnsafeUrl("must be an http:// or https:// URL")
    if not parts.hostname:
        raise UnsafeUrl("must name a host")
    if parts.username or parts.password:
        raise UnsafeUrl("must not carry credentials")
    if len(url) > 2048:
        raise UnsafeUrl("must be at most 2048 characters")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeUrl("has an invalid port") from None
    return parts.hostname, port


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


async def check_url(url: str, allow_private: bool) -> None:
    """Raises UnsafeUrl unless every address the host resolves to may be used."""
    host, port = check_shape(url)
    if allow_private:
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise UnsafeUrl(f"host {host} does not resolve") from None
    for info in infos:
        if not is_public(str(info[4][0])):
            raise UnsafeUrl(f"host {host} resolves to a private, loopback or link-local address")
