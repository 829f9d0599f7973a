"""Where webhooks may go (SPEC section 8, issue 9 item 5): which addresses count as public, which
URLs are well-formed, and, with real receivers on 127.0.0.1 and a name server played by the test,
that a POST goes to the address that was checked, with the URL's Host header and TLS name."""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from switchboard.db import connect_database
from switchboard.ids import new_id, utc_now
from switchboard.webhooks.safety import (
    IPAddress,
    UnsafeUrl,
    check_shape,
    checked_addresses,
    embedded_ipv4,
    is_public,
)
from switchboard.webhooks.sender import post_signed
from switchboard.webhooks.signing import new_secret
from tests.harness import ServerThread, Workspace
from tests.receiver import Receiver

NAME = "hooks.rebind.test"  # never resolved by the system: only the test's resolver answers
ip = ipaddress.ip_address


class Rebinding:
    """A name server that answers `first` to the first question and `then` to every later one:
    the rebinding attack, where the check and the connection each ask."""

    def __init__(self, first: Sequence[str], then: Sequence[str] = ("::1",)) -> None:
        self.first = [ip(a) for a in first]
        self.then = [ip(a) for a in then]
        self.questions: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.questions.append((host, port))
        return self.first if len(self.questions) == 1 else self.then


# --- pure: addresses -------------------------------------------------------------------------

PUBLIC_OR_NOT = [
    # globally routable
    ("93.184.216.34", True),
    ("8.8.8.8", True),
    ("2001:4860:4860::8888", True),
    ("2620:fe::fe", True),
    ("::ffff:8.8.8.8", True),  # IPv4-mapped: the packets go to 8.8.8.8
    ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
    ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
    # IPv4 that is not
    ("127.0.0.1", False),
    ("10.0.0.7", False),
    ("172.16.0.1", False),
    ("192.168.1.1", False),
    ("169.254.169.254", False),  # link-local: cloud metadata
    ("100.64.0.1", False),  # shared address space (carrier-grade NAT)
    ("100.100.100.200", False),  # a cloud metadata service inside 100.64.0.0/10
    ("0.0.0.0", False),  # noqa: S104 - an address to judge, not one to bind
    ("0.1.2.3", False),
    ("192.0.0.170", False),
    ("192.0.2.1", False),  # documentation
    ("198.18.0.1", False),  # benchmarking
    ("224.0.0.1", False),  # multicast
    ("240.0.0.1", False),
    ("255.255.255.255", False),
    # IPv6 that is not
    ("::1", False),
    ("::", False),
    ("fe80::1", False),
    ("fc00::1", False),
    ("fd12:3456::1", False),
    ("fec0::1", False),  # site-local: Python 3.11 calls it global
    ("ff0e::1", False),  # global-scope multicast: Python calls it global
    ("2001:db8::1", False),
    ("3fff::1", False),  # documentation (RFC 9637)
    ("100::1", False),  # discard
    ("::7f00:1", False),  # IPv4-compatible, deprecated
    ("::ffff:0:7f00:1", False),  # IPv4-translated
    # IPv6 that carries a non-public IPv4
    ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False),
    ("::ffff:100.100.100.200", False),
    ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::1", False),  # 6to4 of 169.254.169.254
    ("2002:6464:64c8::", False),  # 6to4 of 100.100.100.200
    ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
    ("64:ff9b:1::808:808", False),  # local-use NAT64: local whatever it carries
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo, client 192.0.2.45
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo, client 127.0.0.1
]


def test_only_globally_routable_addresses_are_public() -> None:
    wrong = [(a, expected) for a, expected in PUBLIC_OR_NOT if is_public(ip(a)) != expected]
    assert not wrong, f"misjudged (address, should be public): {wrong}"


def test_the_ipv4_inside_an_ipv6_address() -> None:
    table = [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("2002:a9fe:a9fe::1", "169.254.169.254"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),  # Teredo's client, un-inverted
        ("2001:4860:4860::8888", None),
        ("fe80::1", None),
    ]
    got = [(a, embedded_ipv4(ipaddress.IPv6Address(a))) for a, _ in table]
    assert got == [(a, None if v4 is None else ip(v4)) for a, v4 in table]


# --- pure: the shape of a URL ----------------------------------------------------------------

MALFORMED = [
    "http://[::1",
    "http://[zz]/",
    "http://[::1]]/",
    "http://%5B::1%5D/",
    "http://example.com:99999/",
    "http://example.com:-1/",
    "https://example.com:0/",
    "http://exa mple.com/",
    "http://127.0.0.%31/",
    "http://a..b/",
    "http://xn--/",
    "http:///x",
    "http://",
    "ftp://example.com/x",
    "javascript:alert(1)",
    "http://user:pw@example.com/",
    "http://example.com\\@127.0.0.1/",  # a backslash some parsers read as a path
    "http://" + "a" * 64 + ".com/",  # a label longer than DNS allows
    "https://example.com/" + "x" * 2048,
]


def test_malformed_urls_are_unsafe_urls_not_crashes() -> None:
    escaped = []
    for url in MALFORMED:
        try:
            check_shape(url)
            escaped.append((url, "accepted"))
        except UnsafeUrl as unsafe:
            assert str(unsafe) and "\x00" not in str(unsafe)
        except Exception as other:  # what would have been a 500
            escaped.append((url, type(other).__name__))
    assert not escaped, escaped


def test_well_formed_urls_keep_their_host_for_the_host_header_and_tls() -> None:
    idn = check_shape("https://bücher.example:8443/hook?x=1")
    assert (idn.host, idn.port, idn.host_header) == (
        "xn--bcher-kva.example",
        8443,
        "xn--bcher-kva.example:8443",
    )
    assert str(idn.at(ip("2001:db8::1"))) == "https://[2001:db8::1]:8443/hook?x=1"
    literal = check_shape("http://[2620:fe::fe]/x")
    assert literal.literal == ip("2620:fe::fe") and literal.port == 80
    assert check_shape("HTTPS://Hooks.Example.COM/x").host == "hooks.example.com"


# --- resolving once, checking every answer ---------------------------------------------------


async def test_every_address_of_a_name_is_checked_and_the_error_names_the_setting() -> None:
    target = check_shape(f"https://{NAME}/hook")
    mixed = Rebinding(["93.184.216.34", "10.0.0.7"])
    with pytest.raises(UnsafeUrl) as refused:
        await checked_addresses(target, allow_private=False, resolve=mixed)
    assert "SWITCHBOARD_WEBHOOK_ALLOW_PRIVATE" in str(refused.value)
    assert "10.0.0.7" not in str(refused.value)  # an internal DNS answer is not shown
    assert mixed.questions == [(NAME, 443)]
    public = Rebinding(["93.184.216.34", "2620:fe::fe", "93.184.216.34"])
    assert await checked_addresses(target, allow_private=False, resolve=public) == [
        ip("93.184.216.34"),
        ip("2620:fe::fe"),
    ]
    answers: list[list[IPAddress] | Exception] = [
        [],
        OSError("no such name"),
        UnicodeError("label too long"),
    ]
    for answer in answers:

        async def resolve(host: str, port: int, answer: Any = answer) -> list[IPAddress]:
            if isinstance(answer, Exception):
                raise answer
            return list(answer)

        with pytest.raises(UnsafeUrl, match="does not resolve"):
            await checked_addresses(target, allow_private=False, resolve=resolve)


# --- a real receiver -------------------------------------------------------------------------


def sample() -> tuple[bytes, dict[str, str]]:
    return b'{"event_id": "evt_test"}', {"Content-Type": "application/json"}


async def test_a_name_that_rebinds_gets_its_post_on_the_checked_address_only() -> None:
    receiver = Receiver().start()
    try:
        # 127.0.0.1 (the receiver) to the first question; ::1 (where nothing listens) after.
        resolver = Rebinding(["127.0.0.1"])
        body, headers = sample()
        async with httpx.AsyncClient(timeout=5) as http:
            outcome = await post_signed(
                http,
                f"http://{NAME}:{receiver.port}/hook",
                body,
                headers,
                allow_private=True,  # 127.0.0.1 is the only address a test may use
                now=utc_now(),
                resolve=resolver,
            )
        assert outcome.ok and outcome.status_code == 200, outcome
        assert resolver.questions == [(NAME, receiver.port)]  # asked once
        [got] = receiver.received
        assert got.headers["Host"] == f"{NAME}:{receiver.port}" and got.body == body
    finally:
        receiver.stop()


async def test_a_refused_address_gets_nothing_and_the_log_names_the_setting() -> None:
    receiver = Receiver().start()
    try:
        for url, resolver in (
            (f"http://{NAME}:{receiver.port}/hook", Rebinding(["127.0.0.1"])),
            (receiver.url, Rebinding([])),  # a literal: nobody is asked
        ):
            body, headers = sample()
            async with httpx.AsyncClient(timeout=5) as http:
                outcome = await post_signed(
                    http, url, body, headers, False, utc_now(), resolve=resolver
                )
            assert not outcome.ok and outcome.error is not None
            assert outcome.error.startswith("refused: ")
            assert "SWITCHBOARD_WEBHOOK_ALLOW_PRIVATE" in outcome.error
        assert not receiver.received
    finally:
        receiver.stop()


async def test_a_malformed_stored_url_is_an_attempt_that_failed_not_a_crash() -> None:
    body, headers = sample()
    async with httpx.AsyncClient(timeout=5) as http:
        for url in ("http://[::1", "http://[zz]/", "http://example.com:99999/"):
            outcome = await post_signed(http, url, body, headers, True, utc_now())
            assert not outcome.ok and outcome.error is not None, url
            assert outcome.error.startswith("refused: "), outcome.error


# --- TLS: the server name is the URL's, and the certificate is checked against it -------------


@dataclass
class TlsReceiver:
    """An HTTPS receiver on 127.0.0.1 with a certificate for NAME only; records the TLS server
    name each client asked for and the Host header of each request."""

    cert: Path
    key: Path
    server_names: list[str | None] = field(default_factory=list)
    hosts: list[str | None] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    def start(self) -> TlsReceiver:
        receiver = self
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        context.sni_callback = lambda _sock, name, _ctx: receiver.server_names.append(name)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.hosts.append(self.headers.get("Host"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[TlsReceiver]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert)),
            *("-subj", f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME}"),
        ],
        check=True,
        capture_output=True,
    )
    receiver = TlsReceiver(cert, key).start()
    yield receiver
    receiver.stop()


async def test_tls_uses_the_url_host_as_server_name_and_verifies_the_certificate_for_it(
    tls_receiver: TlsReceiver,
) -> None:
    body, headers = sample()
    trust = ssl.create_default_context(cafile=str(tls_receiver.cert))
    async with httpx.AsyncClient(timeout=5, verify=trust) as http:
        outcome = await post_signed(
            http,
            f"https://{NAME}:{tls_receiver.port}/hook",
            body,
            headers,
            True,
            utc_now(),
            resolve=Rebinding(["127.0.0.1"]),
        )
        assert outcome.ok and outcome.status_code == 204, outcome
        assert tls_receiver.server_names == [NAME]
        assert tls_receiver.hosts == [f"{NAME}:{tls_receiver.port}"]
        # The same address under a name the certificate does not cover: refused by TLS, so the
        # pinned connection still checks the certificate, against the URL's name.
        other = "other.rebind.test"
        mismatch = await post_signed(
            http,
            f"https://{other}:{tls_receiver.port}/hook",
            body,
            headers,
            True,
            utc_now(),
            resolve=Rebinding(["127.0.0.1"]),
        )
        assert not mismatch.ok and mismatch.error == "ConnectError", mismatch
        assert tls_receiver.hosts == [f"{NAME}:{tls_receiver.port}"]  # nothing more arrived


# --- the API ---------------------------------------------------------------------------------


def assert_invalid_url(response: httpx.Response, url: str) -> str:
    assert response.status_code == 400, (url, response.status_code, response.text)
    envelope = response.json()
    assert envelope["error_code"] == "INVALID_ARGUMENT", (url, envelope)
    assert envelope["message"].startswith("url: ") and envelope["request_id"], (url, envelope)
    return str(envelope["message"])


async def test_malformed_urls_are_400_on_create_update_and_test(
    client: httpx.AsyncClient, workspace: Workspace, database_url: str
) -> None:
    h = workspace.headers
    receiver = Receiver().start()
    try:
        created = await client.post("/v1/webhooks", headers=h, json={"url": receiver.url})
        hook_id = created.json()["id"]
        for url in MALFORMED:
            made = await client.post("/v1/webhooks", headers=h, json={"url": url})
            patched = await client.patch(f"/v1/webhooks/{hook_id}", headers=h, json={"url": url})
            if len(url) > 2048:  # the request model's own limit answers first
                assert made.status_code == patched.status_code == 400
                continue
            assert_invalid_url(made, url)
            assert_invalid_url(patched, url)
        # A URL stored before these checks existed: the test send reports it, it does not crash.
        database = await connect_database(database_url, min_size=1, max_size=1)
        try:
            async with database.workspace(workspace.id) as conn:
                stored = await conn.fetchval(
                    """INSERT INTO webhook_endpoints (id, workspace_id, url, secret)
                       VALUES ($1, $2, 'http://[::1', $3) RETURNING id""",
                    new_id("whk"),
                    workspace.id,
                    new_secret(),
                )
        finally:
            await database.close()
        tested = await client.post("/v1/webhooks/test", headers=h, json={"webhook_id": stored})
        assert tested.status_code == 200, tested.text
        assert tested.json()["ok"] is False
        assert tested.json()["error"].startswith("refused: is not a valid URL")
        assert not receiver.received
    finally:
        receiver.stop()


async def test_non_public_urls_are_refused_with_the_setting_named(
    make_server: Any, workspace: Workspace
) -> None:
    strict: ServerThread = make_server(webhook_allow_private=False)
    async with httpx.AsyncClient(base_url=strict.url, timeout=10) as http:
        for url in (
            "http://127.0.0.1:8080/x",
            "http://100.100.100.200/latest/meta-data/",
            "http://100.64.0.1/",
            "http://[fec0::1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[2002:a9fe:a9fe::1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[64:ff9b:1::808:808]/",
        ):
            response = await http.post("/v1/webhooks", headers=workspace.headers, json={"url": url})
            message = assert_invalid_url(response, url)
            assert "SWITCHBOARD_WEBHOOK_ALLOW_PRIVATE" in message, message
