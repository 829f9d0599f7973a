"""Cursor pagination: no row lost or repeated across pages while rows are being inserted."""

from __future__ import annotations

import asyncio

import httpx

from switchboard.api.pagination import decode_page_token, encode_page_token
from tests.harness import Workspace


def test_page_tokens_round_trip_and_are_bound_to_their_list() -> None:
    token = encode_page_token("calls", 42)
    assert decode_page_token("calls", token) == 42
    assert decode_page_token("calls", None) is None
    for bad in ("x", encode_page_token("agents", 42), "e30", "!!!!"):
        try:
            decode_page_token("calls", bad)
        except Exception as error:
            assert "page_token" in str(error)
        else:
            raise AssertionError(f"{bad!r} was accepted")


async def create_call(client: httpx.AsyncClient, workspace: Workspace, n: int) -> str:
    response = await client.post(
        "/v1/calls",
        headers=workspace.headers,
        json={"to_number": f"+1415555{n:04d}", "from_number": "+14155550000"},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_no_row_lost_or_repeated_while_rows_are_inserted(
    client: httpx.AsyncClient, workspace: Workspace
) -> None:
    existing = [await create_call(client, workspace, n) for n in range(45)]
    inserting = asyncio.Event()
    inserted: list[str] = []

    async def insert_meanwhile() -> None:
        inserting.set()
        for n in range(100, 130):
            inserted.append(await create_call(client, workspace, n))

    writer = asyncio.create_task(insert_meanwhile())
    await inserting.wait()
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"page_size": 7}
        if token:
            params["page_token"] = token
        body = (await client.get("/v1/calls", headers=workspace.headers, params=params)).json()
        seen.extend(call["id"] for call in body["calls"])
        pages += 1
        assert len(body["calls"]) <= 7
        token = body.get("next_page_token")
        if token is None:
            break
    await writer
    assert len(seen) == len(set(seen)), "a row was repeated"
    assert set(existing) <= set(seen), "a row that existed before paging began was lost"
    assert set(seen) <= set(existing) | set(inserted)
    assert pages >= 7
    # Newest first: the pre-existing rows appear in reverse creation order.
    order = [i for i in seen if i in set(existing)]
    assert order == list(reversed(existing))
    # The last page is the one without a next_page_token, even when it is exactly full.
    everything = (
        await client.get("/v1/calls", headers=workspace.headers, params={"page_size": 100})
    ).json()
    assert "next_page_token" not in everything
    assert len(everything["calls"]) == 75
