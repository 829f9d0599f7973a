"""Stream affinity (api/affinity.py): which worker owns a stream, and passing a live TCP
connection with what was read from it to another worker over a real Unix socket. That a
`serve --workers 2` serves each call's streams from one process is in test_workers.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from switchboard.api.affinity import MAX_PASSED_BYTES, Handoffs, owner_of


def test_a_call_and_its_transcript_share_an_owner_and_a_conversation_has_one() -> None:
    for workers in (2, 3, 8):
        for call in ("call_1CB6vOdJvkj6h8zWD7yZOo", "call_x", "call_%41"):
            owner = owner_of(f"/v1/calls/{call}/stream".encode(), workers)
            assert owner is not None and 0 <= owner < workers
            for target in (
                f"/v1/calls/{call}/transcript/stream",
                f"/v1/calls/{call}/transcript/stream?token=abc",
                f"/v1/calls/{call}/stream?cursor=x&token=y",
            ):
                assert owner_of(target.encode(), workers) == owner, target
        conversation = owner_of(b"/v1/conversations/conv_abc/stream", workers)
        assert conversation is not None and 0 <= conversation < workers


def test_only_streams_named_by_an_id_have_an_owner() -> None:
    for target in (
        b"/v1/events/stream",
        b"/v1/calls/call_a",
        b"/v1/calls/call_a/transcript",
        b"/v1/calls/call_a/stream/more",
        b"/v1/calls//stream",
        b"/v1/calls/call_a/dtmf",
        b"/v1/conversations/conv_a/transcript/stream",
        b"/v1/conversations/conv_a/messages",
        b"/v2/calls/call_a/stream",
        b"/calls/call_a/stream",
    ):
        assert owner_of(target, 2) is None, target
    assert owner_of(b"/v1/calls/call_a/stream", 1) is None  # one worker: nothing to pass


def test_owners_spread_over_the_workers() -> None:
    owners = [owner_of(f"/v1/calls/call_{n}/stream".encode(), 3) for n in range(300)]
    counts = [owners.count(worker) for worker in range(3)]
    assert all(count > 50 for count in counts), counts


@pytest.fixture
async def tcp_pair() -> AsyncIterator[
    tuple[socket.socket, asyncio.StreamReader, asyncio.StreamWriter]
]:
    """A real TCP connection on 127.0.0.1: the server's socket and the client's streams."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    reader, writer = await asyncio.open_connection(*listener.getsockname())
    server_side, _ = await asyncio.get_running_loop().sock_accept(listener)
    yield server_side, reader, writer
    writer.close()
    server_side.close()
    listener.close()


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[tuple[Handoffs, Handoffs, dict[str, int]]]:
    """Two workers' ends of the exchange (neither started), counting into one place."""
    counts: dict[str, int] = {}
    sender, owner = Handoffs(tmp_path, 0, 2, counts), Handoffs(tmp_path, 1, 2, counts)
    yield sender, owner, counts
    sender.close()
    owner.close()


async def test_a_connection_passed_to_its_owner_is_the_clients_own(
    workers: tuple[Handoffs, Handoffs, dict[str, int]],
    tcp_pair: tuple[socket.socket, asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    server_side, reader, writer = tcp_pair
    sender, owner, counts = workers
    adopted: asyncio.Queue[tuple[socket.socket, bytes]] = asyncio.Queue()
    owner.open(lambda sock, head: adopted.put_nowait((sock, head)))
    sender.open(lambda sock, head: pytest.fail("nothing is passed to the sender"))
    head = b"GET /v1/calls/call_a/stream HTTP/1.1\r\n\r\n"
    assert sender.send(1, server_side.fileno(), head)
    # The sender lets go of its descriptor: the connection lives on in the owner's.
    server_side.close()
    async with asyncio.timeout(5):
        taken, read = await adopted.get()
    assert read == head
    with taken:
        assert taken.getpeername() == writer.get_extra_info("sockname")
        taken.sendall(b"from the owner")
        async with asyncio.timeout(5):
            assert await reader.readexactly(14) == b"from the owner"
        writer.write(b"to the owner")
        await writer.drain()
        taken.settimeout(5)
        assert taken.recv(100) == b"to the owner"
    assert counts == {"passed": 1, "adopted": 1}


async def test_an_owner_that_cannot_take_a_connection_leaves_it_here(
    workers: tuple[Handoffs, Handoffs, dict[str, int]],
    tcp_pair: tuple[socket.socket, asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    server_side, reader, _writer = tcp_pair
    sender, owner, counts = workers
    request = b"GET /v1/calls/call_a/stream HTTP/1.1\r\n\r\n"
    sender.open(lambda sock, head: None)
    # The owner not started yet, then too much read to pass whole, then the owner stopped.
    assert not sender.send(1, server_side.fileno(), request)
    owner.open(lambda sock, head: sock.close())
    assert not sender.send(1, server_side.fileno(), b"x" * (MAX_PASSED_BYTES + 1))
    owner.close()
    assert not sender.send(1, server_side.fileno(), request)
    # And once the sender itself has stopped.
    sender.close()
    assert not sender.send(1, server_side.fileno(), request)
    assert counts == {"kept": 4}
    # Still this worker's to serve.
    server_side.sendall(b"still here")
    async with asyncio.timeout(5):
        assert await reader.readexactly(10) == b"still here"


async def test_a_worker_that_cannot_listen_serves_what_it_accepts(
    tmp_path: Path,
    tcp_pair: tuple[socket.socket, asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    server_side, _reader, _writer = tcp_pair
    too_deep = tmp_path / ("d" * 120)  # longer than a Unix socket's path may be
    too_deep.mkdir()
    counts: dict[str, int] = {}
    worker = Handoffs(too_deep, 0, 2, counts)
    worker.open(lambda sock, head: None)  # no exception: the worker still starts
    try:
        assert not worker.send(1, server_side.fileno(), b"GET / HTTP/1.1\r\n\r\n")
        assert counts == {"kept": 1}
    finally:
        worker.close()
