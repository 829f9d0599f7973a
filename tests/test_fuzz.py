"""Fuzzing the HTTP edge (issue 9, item 3): 10,000 seeded random requests across every route the
router lists, the stream paths and WebSocket upgrades included, with random methods, ids, query
strings, headers and bodies. Every request must get a complete response, none may be a 5xx, and
every 4xx must carry the error envelope with its `X-Request-Id`.

The requests are written as raw bytes on a few keep-alive connections (an HTTP client library
would refuse or repair much of what is sent here), and the answers are parsed by hand."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson
import pytest

from switchboard.ids import new_id
from tests.harness import ServerThread, Workspace
from tests.routes import fastapi_app, fill, routes

SEED = 20260515
REQUESTS = 10_000
CONNECTIONS = 4
ANSWER_WITHIN = 20.0  # seconds; the write deadline is 10 s, so no answer by then is a hang
ENVELOPE = {"error_code", "message", "request_id", "documentation_url"}

PREFIX_OF = {
    "call_id": "call",
    "conversation_id": "conv",
    "agent_id": "agt",
    "key_id": "key",
    "webhook_id": "whk",
    "delivery_id": "del",
}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "FOO"]
EVENT_TYPES = ["call.initiated", "call.completed", "message.received", "message.*", "nope", ""]
URLS = [
    "http://127.0.0.1:9/hook",
    "https://127.0.0.1/x",
    "http://[::1]:9/",
    "http://localhost:9/a?b=c",
    "http://[::1",
    "http://127.0.0.1:99999/",
    "ftp://127.0.0.1/",
    "http://",
    "not a url",
    "http://127.0.0.1/\x00",
    "http://127.0.0.1:9/" + "a" * 3000,
    "",
]
STRINGS = [
    "",
    " ",
    "a",
    "Ava",
    "\x00",
    "nul\x00inside",
    "line\nbreak",
    "\ud800",
    "\udfff tail",
    "é ü 😀",
    "\u202e\u2028",
    "x" * 5000,
    "+14155550100",
    "+1",
    "12#\n",
    "pk_live_" + "A" * 40,
]
HUGE_SEQS = [2**63, 2**63 + 1, 2**64 - 1, 2**64, 2**80, -(2**63) - 1, -1, 0]


@dataclass
class Probe:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    chunked: bool = False
    upgrade: bool = False

    def describe(self, secret: str) -> str:
        text = f"{self.method} {self.target[:300]!r} body={self.body[:120]!r}"
        return text.replace(secret, "<key>")


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    close: bool


class Dropped(Exception):
    """The connection ended before a complete response."""


@dataclass
class Findings:
    secret: str
    failures: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    def fail(self, probe: Probe, problem: str) -> None:
        self.failures.append(f"{problem}: {probe.describe(self.secret)}")


class RequestMaker:
    """Random requests from a seeded generator; every choice goes through `self.rng`."""

    def __init__(
        self,
        rng: random.Random,
        templates: list[tuple[str, str, list[str]]],
        bodies: dict[tuple[str, str], list[str]],
        ids: dict[str, list[str]],
        workspace: Workspace,
        host: bytes,
    ) -> None:
        self.rng = rng
        self.templates = templates
        self.bodies = bodies
        self.ids = ids
        self.workspace = workspace
        self.host = host

    def probe(self) -> Probe:
        rng = self.rng
        method, template, params = rng.choice(self.templates)
        upgrade = method == "WS" or rng.random() < 0.03
        if method == "WS":
            method = "GET"
        elif rng.random() < 0.15:
            method = rng.choice(METHODS)
        path = self.path(template, params)
        query = self.query()
        target = path + (b"?" + query if query else b"")
        headers = [(b"host", self.host), *self.auth(), *self.extra_headers()]
        body, content_type = b"", None
        if method in ("POST", "PATCH", "PUT", "DELETE") or rng.random() < 0.05:
            body, content_type = self.body(template)
        if content_type is not None:
            headers.append((b"content-type", content_type))
        chunked = bool(body) and rng.random() < 0.15
        if upgrade:
            key = base64.b64encode(rng.randbytes(16))
            headers += [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
            if rng.random() < 0.9:
                headers.append((b"sec-websocket-key", key))
            headers.append((b"sec-websocket-version", rng.choice([b"13", b"13", b"8"])))
            body, chunked = b"", False
        rng.shuffle(headers)
        return Probe(method, target, headers, body, chunked, upgrade)

    # --- parts of a request ---

    def an_id(self, name: str) -> str:
        rng = self.rng
        prefix = PREFIX_OF.get(name, "x")
        real = self.ids.get(name, [])
        roll = rng.random()
        if real and roll < 0.35:
            base = rng.choice(real)
        elif roll < 0.6:
            base = new_id(prefix)
        else:
            base = rng.choice(
                [
                    new_id(rng.choice(["call", "conv", "agt", "key", "whk", "del", "st"])),
                    prefix + "_short",
                    prefix + "_" + "A" * 65,
                    "x" * 3000,
                    "*",
                    ">",
                    "..",
                    "a.b",
                    "%",
                    "%zz",
                    "%FF%FE",
                    "%00",
                    "%C3%A9",
                ]
            )
        suffix = rng.choice(["", "", "", "", "%0A", "%0D%0A", "%00", "%20", "%2F", "%09", "\n"])
        return base + suffix

    def path(self, template: str, params: list[str]) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.04:
            return rng.choice(
                [
                    b"/",
                    b"//",
                    b"/v1",
                    b"/v1/",
                    b"/v1/nothing",
                    b"/web/app.js",
                    b"/web/../../etc/passwd",
                    b"/web/%2e%2e/%2e%2e/etc/passwd",
                    b"/docs",
                    b"/metrics",
                    b"/openapi.json",
                    b"/readyz",
                    b"*",
                    b"http://127.0.0.1/v1/workspace",
                    b"/v1/calls/\xc3\xa9/stream",
                    b"/v1/\xff",
                    b"/v1/calls/%E2%80%AE/transcript/stream",
                    b"/%1b[31mred%1b[0m",
                ]
            )
        filled = fill(template, {name: self.an_id(name) for name in params})
        raw = filled.encode("utf-8", "surrogatepass")
        raw = raw.replace(b"\n", b"%0A")  # a raw newline would end the request line
        if rng.random() < 0.05:
            raw += b"/"
        return raw

    def query(self) -> bytes:
        rng = self.rng
        pairs: list[tuple[str, str]] = []
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3])):
            kind = rng.random()
            if kind < 0.3:
                pairs.append(("page_size", str(rng.choice([1, 5, 20, 100, 0, -1, 101, 2**64]))))
            elif kind < 0.55:
                pairs.append(("page_token", self.page_token()))
            elif kind < 0.75:
                name = rng.choice(
                    ["token", "TOKEN", "Token", "tok%65n", "%74oken", "access_token", "api_key"]
                )
                value = rng.choice([self.workspace.key, "garbage", "", "st_abc.def", "%00"])
                pairs.append((name, value))
            else:
                name = rng.choice(
                    ["last_event_id", "from", "event_types", "status", "ai_mode", "x", "%00"]
                )
                value = rng.choice(
                    ["start", new_id("evt"), "evt_\n", "%FF", ",".join(EVENT_TYPES), "completed"]
                )
                pairs.append((name, value))
        parts = []
        for name, value in pairs:
            # Names and values may already hold escapes on purpose; quote only what would break
            # the request line.
            parts.append(f"{name}={quote(value, safe='%_.*-~:,')}".encode())
        return b"&".join(parts)

    def page_token(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:
            resource = rng.choice(["calls", "agents", "keys", "conversations", "webhooks", "x"])
            seq: Any = rng.choice([*HUGE_SEQS, 1.5, "1", True, None, [1], 12345])
            raw = json.dumps({"r": resource, "s": seq}).encode()
            return base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if roll < 0.8:
            raw = rng.choice([b"null", b"[]", b"{}", b'{"r":"calls"}', b"\xff\xfe", b"{" * 50])
            return base64.urlsafe_b64encode(raw).decode()
        return rng.choice(["garbage", "", "%00", "====", "a" * 4000, "eyJyIjoiY2FsbHMi"])

    def auth(self) -> list[tuple[bytes, bytes]]:
        rng = self.rng
        if rng.random() < 0.8:
            return [(b"authorization", f"Bearer {self.workspace.key}".encode())]
        return rng.choice(
            [
                [],
                [(b"authorization", b"Bearer")],
                [(b"authorization", b"Bearer pk_live_" + b"A" * 40)],
                [(b"authorization", b"Bearer st_abc.def")],
                [(b"authorization", b"Basic dXNlcjpwYXNz")],
                [(b"authorization", b"Bearer \xff\xfe")],
                [(b"authorization", f"Bearer {self.workspace.key}".encode())] * 2,
            ]
        )

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        rng = self.rng
        headers: list[tuple[bytes, bytes]] = []
        if rng.random() < 0.1:
            headers.append((b"last-event-id", rng.choice([b"", b"evt_x", b"\xff", b"1" * 500])))
        if rng.random() < 0.05:
            headers.append((b"x-request-id", b"req_forged\xff"))
        if rng.random() < 0.05:
            headers.append((b"accept", rng.choice([b"text/event-stream", b"*/*", b"\x01"])))
        if rng.random() < 0.02:
            headers.append((b"x-padding", b"p" * rng.choice([100, 5000, 9000, 15000])))
        if rng.random() < 0.003:
            headers.append((b"x-padding", b"p" * 20_000))  # over the 16 KiB limit: 431
        return headers

    def body(self, template: str) -> tuple[bytes, bytes | None]:
        rng = self.rng
        content_type = rng.choice(
            [
                b"application/json",
                b"application/json",
                None,
                b"text/plain",
                b"application/json; charset=latin-1",
                b"application/x-www-form-urlencoded",
                b"multipart/form-data; boundary=x",
                b"application/merge-patch+json",
            ]
        )
        roll = rng.random()
        if roll < 0.002:
            return b'{"name": "' + b"a" * (1024 * 1024) + b'"}', content_type  # 413
        if roll < 0.6:
            fields = [
                name
                for (_m, path), names in self.bodies.items()
                if path == template
                for name in names
            ] or ["name"]
            chosen = {name: self.field_value(name) for name in fields if rng.random() < 0.7}
            if rng.random() < 0.1:
                chosen[rng.choice(["colour", "\x00", "ä"])] = 1
            return json.dumps(chosen).encode(), content_type
        if roll < 0.75:
            return json.dumps(self.json_value(4)).encode(), content_type
        return (
            rng.choice(
                [
                    b"",
                    b"{",
                    b'{"name": "\xff\xfe"}',
                    b"\xef\xbb\xbf{}",
                    b"[" * 100_000,
                    b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
                    b"1" * 5_000,
                    b'{"ttl_seconds": ' + b"9" * 5_000 + b"}",
                    b"name=a&b=c",
                    b"\x00\x01\x02",
                    b'{"name": "a", "name": "b"}',
                    b'{"text": "\\u0000"}',
                    b'{"name": "\\ud800"}',
                    b"NaN",
                    b'{"name": NaN}',
                    b'{"enabled": Infinity}',
                ]
            ),
            content_type,
        )

    def field_value(self, name: str) -> Any:
        rng = self.rng
        if rng.random() < 0.35:
            return self.json_value(2)
        if name == "url":
            return rng.choice(URLS)
        if name.endswith("_number"):
            return rng.choice(["+14155550100", "+14155550101", "+1", "555", "+14155550100\n"])
        if name.endswith("_id") and name in PREFIX_OF:
            return self.an_id(name).replace("%0A", "\n").replace("%00", "\x00")
        if name == "event_types":
            return rng.sample(EVENT_TYPES, rng.randint(0, 3))
        if name == "ai_mode":
            return rng.choice(["ai", "human", "closed", "AI", ""])
        if name in ("enabled",):
            return rng.choice([True, False, "yes", 1])
        if name in ("ttl_seconds",):
            return rng.choice([10, 300, 3600, 0, 2**63, -1, 1.5])
        return rng.choice(STRINGS)

    def json_value(self, depth: int) -> Any:
        rng = self.rng
        kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth > 0 else [])
        kind = rng.choice(kinds)
        if kind == "null":
            return None
        if kind == "bool":
            return rng.random() < 0.5
        if kind == "int":
            return rng.choice([0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30])
        if kind == "float":
            return rng.choice([0.5, -0.0, 1e308, 1e-308])
        if kind == "str":
            return rng.choice(STRINGS)
        if kind == "list":
            return [self.json_value(depth - 1) for _ in range(rng.randint(0, 3))]
        return {
            rng.choice(["name", "text", "url", "a", "\x00", ""]): self.json_value(depth - 1)
            for _ in range(rng.randint(0, 3))
        }


def encode(probe: Probe) -> bytes:
    head = [probe.method.encode() + b" " + probe.target + b" HTTP/1.1"]
    head += [name + b": " + value for name, value in probe.headers]
    if probe.chunked:
        head.append(b"transfer-encoding: chunked")
        chunks = [probe.body[i : i + 7000] for i in range(0, len(probe.body), 7000)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    else:
        if probe.body or probe.method in ("POST", "PUT", "PATCH"):
            head.append(b"content-length: %d" % len(probe.body))
        body = probe.body
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def read_answer(reader: asyncio.StreamReader, method: str) -> Answer:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError) as lost:
        raise Dropped("no response") from lost
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    close = b"close" in headers.get(b"connection", b"").lower()
    if status == 101 or headers.get(b"content-type", b"").startswith(b"text/event-stream"):
        return Answer(status, headers, b"", True)  # a live stream: the caller hangs up
    try:
        if method == "HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
                if size == 0:
                    break
            body = b"".join(parts)
        elif b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        else:
            body, close = await reader.read(), True
    except (asyncio.IncompleteReadError, ConnectionError) as lost:
        raise Dropped("incomplete response") from lost
    return Answer(status, headers, body, close)


def check(probe: Probe, answer: Answer, findings: Findings) -> None:
    findings.statuses[answer.status] += 1
    if answer.status >= 500:
        findings.fail(probe, f"{answer.status} {answer.body[:200]!r}")
        return
    if answer.status == 101:
        if not probe.upgrade:
            findings.fail(probe, "101 without an upgrade")
        return
    request_id = answer.headers.get(b"x-request-id", b"").decode()
    if not request_id.startswith("req_"):
        findings.fail(probe, f"{answer.status} without X-Request-Id")
    if answer.status >= 400 and probe.method != "HEAD":
        try:
            body = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            findings.fail(probe, f"{answer.status} not JSON: {answer.body[:200]!r}")
            return
        if not isinstance(body, dict) or set(body) != ENVELOPE:
            findings.fail(probe, f"{answer.status} not the envelope: {answer.body[:200]!r}")
        elif body["request_id"] != request_id:
            findings.fail(probe, f"{answer.status} request id differs from X-Request-Id")
        if findings.secret in answer.body.decode(errors="replace"):
            findings.fail(probe, f"{answer.status} echoes the key")


async def worker(
    address: tuple[str, int], probes: list[Probe], cursor: list[int], findings: Findings
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while cursor[0] < len(probes):
        probe = probes[cursor[0]]
        cursor[0] += 1
        if writer is None:
            reader, writer = await asyncio.open_connection(*address, limit=4 * 1024 * 1024)
        assert reader is not None
        try:
            writer.write(encode(probe))
            answer = await asyncio.wait_for(read_answer(reader, probe.method), ANSWER_WITHIN)
        except (Dropped, ConnectionError) as lost:
            findings.fail(probe, f"dropped ({lost})")
            answer = None
        except TimeoutError:
            findings.fail(probe, "no answer in time")
            answer = None
        if answer is not None:
            check(probe, answer, findings)
        if answer is None or answer.close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def make_ids(client: httpx.AsyncClient, workspace: Workspace) -> dict[str, list[str]]:
    """Real objects of every kind, so some requests reach rows that exist."""
    h = workspace.headers
    agent = (await client.post("/v1/agents", headers=h, json={"name": "fuzz"})).json()["id"]
    call = (
        await client.post(
            "/v1/calls",
            headers=h,
            json={"to_number": "+14155550100", "from_number": "+14155550101", "agent_id": agent},
        )
    ).json()["id"]
    conversation = (
        await client.post(
            "/v1/messages",
            headers=h,
            json={
                "text": "hello",
                "channel": "sms",
                "to_number": "+14155550100",
                "from_number": "+14155550101",
            },
        )
    ).json()["conversation_id"]
    # A second key to be revoked, never the one the fuzzer sends.
    key = (await client.post("/v1/keys", headers=h, json={"name": "fuzz"})).json()["id"]
    webhook = (
        await client.post("/v1/webhooks", headers=h, json={"url": "http://127.0.0.1:9/hook"})
    ).json()["id"]
    return {
        "agent_id": [agent],
        "call_id": [call],
        "conversation_id": [conversation],
        "key_id": [key],
        "webhook_id": [webhook],
    }


def body_fields(server: ServerThread) -> dict[tuple[str, str], list[str]]:
    """(method, path) -> the property names of its request body, from the OpenAPI description."""
    schema = fastapi_app(server.app).openapi()
    components = schema.get("components", {}).get("schemas", {})
    found: dict[tuple[str, str], list[str]] = {}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {})
            ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
            properties = components.get(ref.rsplit("/", 1)[-1], {}).get("properties", {})
            found[(method.upper(), path)] = list(properties)
    return found


@pytest.fixture(scope="module")
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    """A server whose burst allowance is the whole minute: ten thousand requests of one
    workspace as fast as four connections go would otherwise be refused after the first few
    hundred, and this test is about what the routes answer, not the limits
    (tests/test_limits.py)."""
    return make_server(workspace_burst_seconds=60.0)


async def test_ten_thousand_random_requests_get_no_5xx_and_no_dropped_connection(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace
) -> None:
    ids = await make_ids(client, workspace)
    templates = list(routes(server.app))
    assert sum(1 for method, _, _ in templates if method == "WS") == 1
    assert len(templates) >= 25  # the router really was read
    address = urlsplit(server.url)
    assert address.hostname is not None and address.port is not None
    maker = RequestMaker(
        random.Random(SEED),
        templates,
        body_fields(server),
        ids,
        workspace,
        address.netloc.encode(),
    )
    probes = [maker.probe() for _ in range(REQUESTS)]
    findings = Findings(workspace.key)
    cursor = [0]
    await asyncio.gather(
        *(
            worker((address.hostname, address.port), probes, cursor, findings)
            for _ in range(CONNECTIONS)
        )
    )
    kinds = Counter(f.split(":")[0] for f in findings.failures)
    examples: dict[str, list[str]] = {}
    for failure in findings.failures:
        examples.setdefault(failure.split(":")[0], []).append(failure)
    report = "\n".join(line for group in examples.values() for line in group[:3])
    assert not findings.failures, f"{len(findings.failures)} failures {dict(kinds)}:\n{report}"
    # The run exercised what it was meant to: successes, refusals, the limits and upgrades.
    for status in (200, 201, 400, 401, 404, 413, 431):
        assert findings.statuses[status] > 0, (status, findings.statuses)
    assert findings.statuses[101] > 0
