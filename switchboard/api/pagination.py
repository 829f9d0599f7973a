"""Cursor pagination: an opaque `page_token` that names the last row seen by its `seq`.
Rows are listed newest first by a sequence that only grows, so rows inserted while a client
pages never shift a page boundary: nothing is lost or repeated."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Annotated, Any

import orjson
from fastapi import Query

from switchboard.db import Connection
from switchboard.errors import invalid

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MAX_SEQ = 2**63 - 1  # the largest bigint


def encode_page_token(resource: str, last_seq: int) -> str:
    raw = orjson.dumps({"r": resource, "s": last_seq})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(resource: str, token: str | None) -> int | None:
    """The seq to continue below, or None for the first page; a bad token is a 400."""
    if token is None or token == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = orjson.loads(raw)
        seq = data["s"]
        # A seq is a Postgres bigint: a number outside it (JSON allows any) would fail in the
        # query, as a 500, instead of here. bool is an int to Python, never a seq.
        if data["r"] != resource or type(seq) is not int or not 0 < seq <= MAX_SEQ:
            raise ValueError
        return seq
    except (ValueError, KeyError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise invalid("page_token", f"is not a page token of this {resource} list") from None


def page(
    resource: str, rows: Sequence[Any], page_size: int, items: list[dict[str, Any]]
) -> dict[str, Any]:
    """The list body: `items` are the first `page_size` rows rendered; `rows` were fetched with
    one extra, whose presence says there is a next page."""
    body: dict[str, Any] = {resource: items[:page_size]}
    if len(rows) > page_size:
        body["next_page_token"] = encode_page_token(resource, int(rows[page_size - 1]["seq"]))
    return body


PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Rows per page, 1 to 100.")]
PageToken = Annotated[str | None, Query(description="The next_page_token of the previous page.")]

_PAGED_TABLES = frozenset(
    {
        "api_keys",
        "agents",
        "calls",
        "conversations",
        "messages",
        "webhook_endpoints",
        "webhook_deliveries",
    }
)


async def fetch_page(
    conn: Connection,
    table: str,
    before: int | None,
    page_size: int,
    filters: Sequence[tuple[str, Any]] = (),
) -> list[Any]:
    """Rows of `table`, newest first, below the cursor, one more than a page. `filters` are
    (column, value) equalities; column names come from code, never from a request."""
    if table not in _PAGED_TABLES:
        raise ValueError(f"{table} is not a paged table")
    clauses = ["($1::bigint IS NULL OR seq < $1)"]
    args: list[Any] = [before]
    for column, value in filters:
        if not column.isidentifier():
            raise ValueError(f"bad column {column!r}")
        args.append(value)
        clauses.append(f"{column} = ${len(args)}")
    args.append(page_size + 1)
    sql = (
        f"SELECT * FROM {table} WHERE {' AND '.join(clauses)} "  # noqa: S608 - names are fixed
        f"ORDER BY seq DESC LIMIT ${len(args)}"
    )
    return list(await conn.fetch(sql, *args))
