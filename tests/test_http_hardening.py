"""The HTTP edge under hostile or broken input and while a dependency is down (issue 9, items 2,
3, 4 and 6): whole-string ids, text Postgres can store, page tokens within bigint, undecodable
bodies, the 16 KiB head and body limits, credentials in query strings, what reaches the log,
`Cache-Control: no-store`, refused WebSocket upgrades, and 503 (never 500) while Postgres is
stopped and started again."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from switchboard.api.models import AgentCreate, CallCreate, ConversationUpdate, KeyCreate
from switchboard.auth.keys import looks_like_key
from switchboard.auth.policy import (
    is_stream_path,
    other_query_credentials,
    query_token_allowed,
    stream_call_id,
)
from switchboard.config import Settings, load_settings
from switchboard.db.database import prepare_database
from switchboard.embedded import EmbeddedNats, EmbeddedPostgres
from switchboard.ids import is_id, new_id
from switchboard.logs import printable, redact
from tests.harness import ServerThread, Workspace, eventually, new_workspace
from tests.routes import fastapi_app, fill
from tests.test_fuzz import Answer, read_answer

ENVELOPE = {"error_code", "message", "request_id", "documentation_url"}


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    body: dict[str, str] = response.json()
    assert set(body) == ENVELOPE and body["error_code"] == code, body
    assert response.headers["x-request-id"] == body["request_id"]
    return body


def assert_raw_envelope(answer: Answer, status: int, code: str) -> dict[str, str]:
    assert answer.status == status, (answer.status, answer.body)
    body: dict[str, str] = json.loads(answer.body)
    assert set(body) == ENVELOPE and body["error_code"] == code, body
    assert answer.headers[b"x-request-id"].decode() == body["request_id"]
    return body


async def exchange(url: str, raw: bytes, finish: bool = True) -> tuple[Answer, bool]:
    """Writes `raw` on a new connection and reads one answer; returns it and whether the server
    then closed the connection. With `finish=False` the request is left unfinished on purpose."""
    address = urlsplit(url)
    assert address.hostname is not None and address.port is not None
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(raw)
        answer = await asyncio.wait_for(read_answer(reader, "GET"), 10)
        closed = answer.close and await asyncio.wait_for(reader.read(1), 10) == b""
        return answer, closed
    finally:
        writer.close()


def upgrade(path: str, *headers: str, key: bool = True) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x", "Connection: Upgrade", "Upgrade: websocket"]
    lines += ["Sec-WebSocket-Version: 13", *headers]
    if key:
        lines.append("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- item 3: whole-string ids ---------------------------------------------------------------


def test_ids_paths_and_keys_match_whole_strings_only() -> None:
    call = new_id("call")
    assert is_id(call, "call") and not is_id(call + "\n", "call")
    assert not is_id(call + "\r\n", "call") and not is_id(" " + call, "call")
    assert not looks_like_key("pk_live_" + "A" * 40 + "\n")
    for path in (f"/v1/calls/{call}/stream\n", f"/v1/calls/{call}/transcript/stream\n"):
        assert not query_token_allowed("GET", path)
        assert not is_stream_path(path)
        assert stream_call_id(path) is None
    # The body models' patterns run on pydantic's Rust engine, where `$` is the very end.
    good = {"to_number": "+14155550100", "from_number": "+14155550101"}
    CallCreate.model_validate(good)
    for bad in (
        {**good, "to_number": "+14155550100\n"},
        {**good, "agent_id": new_id("agt") + "\n"},
    ):
        with pytest.raises(ValueError):
            CallCreate.model_validate(bad)


async def test_an_id_with_a_trailing_newline_is_a_400_on_every_stream_path(
    client: httpx.AsyncClient, server: ServerThread, workspace: Workspace
) -> None:
    h = workspace.headers
    call, conversation = new_id("call") + "%0A", new_id("conv") + "%0A"
    for path in (f"/v1/calls/{call}/transcript/stream", f"/v1/conversations/{conversation}/stream"):
        body = assert_envelope(await client.get(path, headers=h), 400, "INVALID_ARGUMENT")
        assert "_id" in body["message"]
    answer, _ = await exchange(
        server.url, upgrade(f"/v1/calls/{call}/stream", f"Authorization: Bearer {workspace.key}")
    )
    assert_raw_envelope(answer, 400, "INVALID_ARGUMENT")
    # A newline after a whole path is no route either (the framework's `$` would match it).
    real = (
        await client.post(
            "/v1/calls",
            headers=h,
            json={"to_number": "+14155550100", "from_number": "+14155550101"},
        )
    ).json()["id"]
    for path in (f"/v1/calls/{real}/transcript/stream%0A", "/v1/workspace%0A"):
        assert_envelope(await client.get(path, headers=h), 404, "NOT_FOUND")


# --- item 3: text Postgres can store, page tokens, undecodable bodies ------------------------


def test_text_fields_refuse_nul_and_lone_surrogates() -> None:
    for model, field in (
        (AgentCreate, "name"),
        (AgentCreate, "instructions"),
        (KeyCreate, "name"),
        (ConversationUpdate, "actor_user_id"),
    ):
        base: dict[str, Any] = {"name": "ok"} if model is AgentCreate else {}
        if model is ConversationUpdate:
            base = {"ai_mode": "human"}
        for bad in ("a\x00b", "\ud800"):
            with pytest.raises(ValueError, match=field):
                model.model_validate({**base, field: bad})


async def test_nul_in_any_text_field_is_a_400_naming_the_field(
    client: httpx.AsyncClient, workspace: Workspace
) -> None:
    h = workspace.headers
    agent = (await client.post("/v1/agents", headers=h, json={"name": "ok"})).json()["id"]
    sms = {"channel": "sms", "to_number": "+14155550150", "from_number": "+14155550151"}
    conversation = (
        await client.post("/v1/messages", headers=h, json={"text": "hi", **sms})
    ).json()["conversation_id"]
    for method, path, body, field in (
        ("POST", "/v1/agents", {"name": "a\x00"}, "name"),
        ("POST", "/v1/agents", {"name": "a", "instructions": "\x00"}, "instructions"),
        ("PATCH", f"/v1/agents/{agent}", {"name": "\x00"}, "name"),
        ("POST", "/v1/keys", {"name": "k\x00"}, "name"),
        ("POST", "/v1/messages", {"text": "nul \x00", **sms}, "text"),
        (
            "PATCH",
            f"/v1/conversations/{conversation}",
            {"ai_mode": "human", "actor_user_id": "u\x00"},
            "actor_user_id",
        ),
    ):
        response = await client.request(method, path, headers=h, json=body)
        message = assert_envelope(response, 400, "INVALID_ARGUMENT")["message"]
        assert message.startswith(field) and "NUL" in message, message
    # A lone surrogate (valid JSON, not valid Unicode) is refused the same way.
    raw = b'{"name": "\\ud800"}'
    response = await client.post("/v1/agents", headers=h, content=raw)
    assert "name" in assert_envelope(response, 400, "INVALID_ARGUMENT")["message"]


async def test_page_tokens_beyond_bigint_are_a_400_on_every_list_route(
    client: httpx.AsyncClient, server: ServerThread, workspace: Workspace
) -> None:
    webhook = (
        await client.post(
            "/v1/webhooks", headers=workspace.headers, json={"url": "http://127.0.0.1:9/h"}
        )
    ).json()["id"]
    schema = fastapi_app(server.app).openapi()
    lists = [
        path
        for path, operations in schema["paths"].items()
        if any(p["name"] == "page_token" for p in operations.get("get", {}).get("parameters", []))
    ]
    assert len(lists) >= 6, lists
    ids = {"webhook_id": webhook, "conversation_id": new_id("conv"), "call_id": new_id("call")}
    for template in lists:
        path = fill(template, ids)
        resource = path.rstrip("/").rsplit("/", 1)[-1]
        for seq in (2**63, 2**64 - 1, 0, -1):
            raw = json.dumps({"r": resource, "s": seq}).encode()
            token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
            response = await client.get(
                path, headers=workspace.headers, params={"page_token": token}
            )
            body = assert_envelope(response, 400, "INVALID_ARGUMENT")
            assert "page_token" in body["message"], (path, body)


async def test_a_body_that_cannot_be_decoded_is_a_400_not_a_404(
    client: httpx.AsyncClient, workspace: Workspace
) -> None:
    for raw in (
        b'{"name": "\xff\xfe"}',  # not UTF-8
        b"[" * 100_000,  # deeper than the parser goes
        b'{"name": ' + b"9" * 5_000 + b"}",  # an int longer than Python converts
    ):
        response = await client.post("/v1/agents", headers=workspace.headers, content=raw)
        body = assert_envelope(response, 400, "INVALID_ARGUMENT")
        assert body["message"].startswith("body"), body


# --- item 3: a 5xx that can still happen ----------------------------------------------------


async def test_a_bug_is_a_500_envelope_and_the_connection_lives_on(
    make_server: Callable[..., ServerThread], workspace: Workspace
) -> None:
    server = make_server()

    async def broken() -> None:
        raise RuntimeError("a bug")

    # A server of its own: the shared one's route table is what the other tests walk.
    fastapi_app(server.app).add_api_route("/v1/broken", broken)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for _ in range(2):  # the same keep-alive connection serves both
            response = await client.get("/v1/broken", headers=workspace.headers)
            body = assert_envelope(response, 500, "INTERNAL")
            assert "a bug" not in body["message"] and "Traceback" not in response.text
            assert response.headers.get("connection") != "close"


# --- item 4: limits -------------------------------------------------------------------------


async def test_a_head_over_16_kib_gets_431_before_the_rest_is_read(server: ServerThread) -> None:
    # The head is never finished: the answer must come from the first 16 KiB alone.
    unfinished = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17_000
    answer, closed = await exchange(server.url, unfinished)
    body = assert_raw_envelope(answer, 431, "INVALID_ARGUMENT")
    assert "16384" in body["message"] and closed
    # Many small headers count the same way.
    many = b"GET /healthz HTTP/1.1\r\n" + b"X-A: bbbbbbbbbbbbbbbb\r\n" * 1_000
    answer, closed = await exchange(server.url, many)
    assert_raw_envelope(answer, 431, "INVALID_ARGUMENT")
    # Just under the limit is an ordinary request.
    fits = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 15_000 + b"\r\n\r\n"
    answer, _ = await exchange(server.url, fits)
    assert answer.status == 200
    # A WebSocket handshake within 16 KiB, but with a header line longer than the WebSocket
    # parser reads (8 KiB), is refused too, instead of waiting forever.
    answer, _ = await exchange(server.url, upgrade("/v1/calls/x/stream", "X-Big: " + "a" * 9000))
    assert_raw_envelope(answer, 431, "INVALID_ARGUMENT")


async def test_the_head_limit_is_a_setting(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_header_bytes=4096)
    over = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5_000 + b"\r\n\r\n"
    answer, closed = await exchange(server.url, over)
    body = assert_raw_envelope(answer, 431, "INVALID_ARGUMENT")
    assert "4096" in body["message"] and closed
    fits = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3_000 + b"\r\n\r\n"
    answer, _ = await exchange(server.url, fits)
    assert answer.status == 200


async def test_an_endless_trailer_is_refused_like_a_head(server: ServerThread) -> None:
    raw = (
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\na\r\n0\r\nX-Trailer: " + b"t" * 40_000
    )
    address = urlsplit(server.url)
    assert address.hostname is not None and address.port is not None
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(raw)
        # Whatever was answered to the request, the connection then ends (read() returns at
        # its end) instead of buffering the trailer for as long as the client sends it.
        await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_bodies_over_the_limit_get_413_before_they_are_buffered(
    make_server: Callable[..., ServerThread], server: ServerThread, workspace: Workspace
) -> None:
    auth = f"Authorization: Bearer {workspace.key}\r\n".encode()
    # The default limit, 1 MiB: a Content-Length one byte over is refused from the head alone.
    head = b"POST /v1/agents HTTP/1.1\r\nHost: x\r\n" + auth
    answer, closed = await exchange(server.url, head + b"Content-Length: 1048577\r\n\r\n")
    assert "1048576" in assert_raw_envelope(answer, 413, "INVALID_ARGUMENT")["message"]
    assert closed
    small = make_server(max_body_bytes=1024)
    # Chunked, with no length up front: refused once the bytes received pass the limit, while
    # the client is still sending (the body is never finished here).
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"200\r\n" + b"a" * 512 + b"\r\n"
    answer, closed = await exchange(small.url, chunked + b"258\r\n" + b"b" * 600 + b"\r\n")
    assert_raw_envelope(answer, 413, "INVALID_ARGUMENT")
    assert closed
    async with httpx.AsyncClient(base_url=small.url, timeout=10) as client:
        at_limit = {"name": "a" * (1024 - len('{"name": ""}'))}
        fits = await client.post("/v1/agents", headers=workspace.headers, json=at_limit)
        assert fits.status_code in (201, 400), fits.text  # read whole: not a 413
        over = await client.post("/v1/agents", headers=workspace.headers, json={"name": "a" * 2000})
        assert_envelope(over, 413, "INVALID_ARGUMENT")
    assert load_settings({"SWITCHBOARD_MAX_BODY_BYTES": "2048"}).max_body_bytes == 2048
    assert Settings().max_body_bytes == 1048576


# --- item 6: secrets and the log ------------------------------------------------------------


def test_credential_query_parameters_are_recognised_in_any_case_and_encoding() -> None:
    key = "pk_live_" + "A" * 40
    for query in (
        b"TOKEN=x",
        b"Token=x",
        b"access_token=x",
        b"api_key=x",
        b"API%5FKEY=x",
        b"%2574oken=x",
        b"other=" + key.encode(),
        b"other=pk%5Flive%5F" + b"A" * 40,
    ):
        assert other_query_credentials(query), query
    for query in (b"token=x", b"tok%65n=x", b"page_token=abc", b"page_size=3&from=start", b""):
        assert not other_query_credentials(query), query


def test_redaction_decodes_names_and_values_and_control_characters_are_escaped() -> None:
    key = "pk_live_" + "B" * 40
    for line in (
        f"GET /v1/calls/x/stream?tok%65n={key}",
        "GET /v1/calls/x/stream?%74oken=opaque-secret",
        "GET /v1/calls/x/stream?TOKEN=opaque-secret",
        "GET /v1/x?Api_Key=opaque-secret",
        "GET /v1/x?access_token=opaque-secret",
        f"GET /v1/x?tok%65n=pk%5Flive%5F{'B' * 40}",
        f"GET /v1/x?q=pk%255Flive%255F{'B' * 40}",
    ):
        cleaned = redact(line)
        assert "opaque-secret" not in cleaned and "B" * 40 not in cleaned, cleaned
        assert "[redacted]" in cleaned
    assert redact("GET /v1/calls?page_size=3&from=start") == "GET /v1/calls?page_size=3&from=start"
    forged = printable("GET /v1/a\n12:00:00 INFO    admin logged in \x1b[2J\u2028")
    assert "\n" not in forged and "\x1b" not in forged and "\u2028" not in forged
    assert "\\x0a" in forged and "\\x1b" in forged


async def test_credentials_in_a_query_are_a_401_everywhere_but_token_on_the_call_streams(
    client: httpx.AsyncClient, workspace: Workspace
) -> None:
    h = workspace.headers
    key = workspace.key
    for query in (
        f"tok%65n={key}",
        f"%74oken={key}",
        f"TOKEN={key}",
        f"access_token={key}",
        f"api_key={key}",
        f"anything={key}",
    ):
        response = await client.get(f"/v1/workspace?{query}", headers=h)
        body = assert_envelope(response, 401, "UNAUTHENTICATED")
        assert "Authorization header" in body["message"] and key not in response.text
    missing = new_id("call")
    stream = f"/v1/calls/{missing}/transcript/stream"
    # `tok%65n` decodes to `token`, the one credential these paths accept: the call is unknown.
    assert_envelope(await client.get(f"{stream}?tok%65n={key}"), 404, "NOT_FOUND")
    for query in (f"TOKEN={key}", f"access_token={key}", f"token={key}&api_key=x"):
        assert_envelope(await client.get(f"{stream}?{query}"), 401, "UNAUTHENTICATED")


async def test_the_log_holds_no_key_however_encoded_and_no_raw_control_characters(
    server: ServerThread, workspace: Workspace, console_log: io.StringIO
) -> None:
    body = workspace.key.removeprefix("pk_live_")
    encoded = f"pk%5Flive%5F{body}"
    call = new_id("call")
    answer, _ = await exchange(server.url, upgrade(f"/v1/calls/{call}/stream?tok%65n={encoded}"))
    assert_raw_envelope(answer, 404, "NOT_FOUND")  # authenticated by the encoded key
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await client.get(f"/v1/calls/{call}/transcript/stream?tok%65n={encoded}")
        await client.get("/v1/a%0A12:00:00 INFO    forged%1b[2J", headers=workspace.headers)

    def logged() -> str:
        return console_log.getvalue()

    await eventually(lambda: logged().count(f"/v1/calls/{call}/") >= 2)
    await eventually(lambda: "forged" in logged())
    text = logged()
    assert body not in text and encoded not in text
    assert "\x1b" not in text
    assert not any(line.startswith("12:00:00 INFO    forged") for line in text.splitlines())
    # The refused upgrade is an ordinary access line, not uvicorn's ERROR (nor its own line
    # with the query string).
    assert f"WS /v1/calls/{call}/stream 404" in text
    assert "ERROR" not in text and "without completing handshake" not in text
    assert '"WebSocket' not in text


async def test_refused_upgrades_are_plain_answers_with_the_envelope(
    server: ServerThread, workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    auth = f"Authorization: Bearer {workspace.key}"
    call = new_id("call")
    with caplog.at_level(logging.INFO):
        answer, closed = await exchange(server.url, upgrade(f"/v1/calls/{call}/stream"))
        assert_raw_envelope(answer, 401, "UNAUTHENTICATED")
        answer, _ = await exchange(server.url, upgrade(f"/v1/calls/{call}/stream", auth))
        assert_raw_envelope(answer, 404, "NOT_FOUND")
        # An upgrade on a path that has no WebSocket: the same 404 as any unknown path.
        answer, _ = await exchange(server.url, upgrade("/v1/workspace", auth))
        assert_raw_envelope(answer, 404, "NOT_FOUND")
        # A handshake the WebSocket layer itself refuses.
        answer, _ = await exchange(server.url, upgrade(f"/v1/calls/{call}/stream", key=False))
        assert_raw_envelope(answer, 400, "INVALID_ARGUMENT")
        # A request the WebSocket parser cannot read at all (a non-ASCII path).
        raw = upgrade(f"/v1/calls/{call}/stream").replace(b"/stream", b"/str\xc3\xa9am")
        answer, _ = await exchange(server.url, raw)
        assert_raw_envelope(answer, 400, "INVALID_ARGUMENT")
        # Malformed HTTP gets the envelope too.
        answer, closed = await exchange(server.url, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        assert_raw_envelope(answer, 400, "INVALID_ARGUMENT")
        assert closed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
    ]


async def test_every_v1_response_is_no_store(
    client: httpx.AsyncClient, workspace: Workspace
) -> None:
    h = workspace.headers
    responses = [
        await client.get("/v1/workspace", headers=h),
        await client.post("/v1/keys", headers=h, json={"name": "secret holder"}),
        await client.post("/v1/webhooks", headers=h, json={"url": "http://127.0.0.1:9/h"}),
        await client.get("/v1/nothing", headers=h),
    ]
    webhook = responses[2].json()["id"]
    responses.append(await client.post(f"/v1/webhooks/{webhook}/rotate-secret", headers=h))
    for response in responses:
        assert response.status_code < 500, response.text
        assert response.headers["cache-control"] == "no-store", response.request.url


# --- item 2: an outage is a 503 -------------------------------------------------------------


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    postgres = EmbeddedPostgres(tmp_path / "postgres", fsync=False)
    postgres.start()
    yield postgres
    postgres.stop()


@pytest.fixture
async def outage_server(
    own_postgres: EmbeddedPostgres, nats_url: str
) -> AsyncIterator[tuple[ServerThread, str]]:
    database_url = own_postgres.url()
    await prepare_database(database_url)
    server = ServerThread(
        Settings(database_url=database_url, nats_url=nats_url), database_url, nats_url
    ).start()
    try:
        yield server, database_url
    finally:
        server.stop()


@pytest.mark.slow
async def test_with_postgres_down_every_path_is_a_503_and_the_log_says_so_once(
    own_postgres: EmbeddedPostgres, outage_server: tuple[ServerThread, str]
) -> None:
    server, database_url = outage_server
    workspace = await new_workspace(database_url, "outage")
    collected = Collected()
    logging.getLogger("switchboard").addHandler(collected)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            h = workspace.headers
            fresh = (await client.post("/v1/keys", headers=h, json={"name": "unused"})).json()
            uncached = {"Authorization": f"Bearer {fresh['api_key']}"}
            call = (
                await client.post(
                    "/v1/calls",
                    headers=h,
                    json={"to_number": "+14155550100", "from_number": "+14155550101"},
                )
            ).json()["id"]
            conversation = new_id("conv")
            port = own_postgres.port
            own_postgres.stop()
            collected.records.clear()
            for _ in range(3):
                for headers, path in (
                    (uncached, "/v1/workspace"),  # authentication itself needs the database
                    (h, "/v1/workspace"),
                    (h, "/v1/calls"),
                    (h, f"/v1/calls/{call}/transcript/stream"),
                    (h, f"/v1/conversations/{conversation}/stream"),
                ):
                    response = await client.get(path, headers=headers)
                    assert_envelope(response, 503, "UNAVAILABLE")
                    assert response.headers["retry-after"] == "1"
                answer, _ = await exchange(
                    server.url,
                    upgrade(f"/v1/calls/{call}/stream", f"Authorization: Bearer {workspace.key}"),
                )
                assert_raw_envelope(answer, 503, "UNAVAILABLE")
            during = list(collected.records)
            own_postgres.start()
            assert own_postgres.port == port, "Postgres must come back on its port"

            async def served() -> bool:
                response = await client.get("/v1/workspace", headers=uncached)
                return response.status_code == 200

            await eventually(served, within=30)
    finally:
        logging.getLogger("switchboard").removeHandler(collected)
    assert not [r for r in during if r.exc_info], [r.getMessage() for r in during if r.exc_info]
    http_lines = [
        r.getMessage() for r in collected.records if r.name == "switchboard.api.middleware"
    ]
    assert sum("unavailable (" in line for line in http_lines) == 1, http_lines
    assert sum("available again" in line for line in http_lines) == 1, http_lines


@pytest.mark.slow
async def test_with_nats_down_opening_a_transcript_stream_is_a_503_logged_once(
    own_nats: EmbeddedNats, own_database: str
) -> None:
    workspace = await new_workspace(own_database)
    settings = Settings(database_url=own_database, nats_url=own_nats.client_url)
    server = ServerThread(settings, own_database, own_nats.client_url).start()
    collected = Collected()
    logging.getLogger("switchboard.api").addHandler(collected)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            h = workspace.headers
            call = (
                await client.post(
                    "/v1/calls",
                    headers=h,
                    json={"to_number": "+14155550100", "from_number": "+14155550101"},
                )
            ).json()["id"]
            own_nats.stop()
            for _ in range(2):
                response = await client.get(f"/v1/calls/{call}/transcript/stream", headers=h)
                assert_envelope(response, 503, "UNAVAILABLE")
                assert response.headers["retry-after"] == "1"
            # (Its end is logged when the bus client reconnects, which takes nats-py's backoff:
            # the Postgres test above covers the line that ends an outage.)
    finally:
        logging.getLogger("switchboard.api").removeHandler(collected)
        server.stop()
    assert not [r for r in collected.records if r.exc_info]
    lines = [r.getMessage() for r in collected.records if r.name == "switchboard.api.middleware"]
    assert sum("bus" in line and "unavailable (" in line for line in lines) == 1, lines
