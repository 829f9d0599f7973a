"""A workspace's transaction in fewer round trips, and savepoints inside it.

asyncpg's `Connection.transaction()` sends `BEGIN` alone, and `app.workspace_id` then needs a
statement of its own: two round trips before the first query of every request. Sent together
as one simple query they are one, about 60 µs of the gateway's CPU and 20 µs of Postgres' per
transaction (docs/decisions.md). A simple query takes no parameters, so the workspace id goes
into the text only when it is a well-formed workspace id (`ids.is_id`: a prefix and base62,
nothing that could end a literal); anything else takes the two round trips with the id as a
parameter, as before.

asyncpg refuses its own `transaction()` inside a transaction it did not begin, so nested work
takes `savepoint()` instead."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Protocol

from switchboard.ids import is_id


class Executes(Protocol):
    """What these need of a connection (asyncpg's, or the pool's proxy for one)."""

    async def execute(self, query: str, *args: object) -> str: ...

    def is_closed(self) -> bool: ...


_SET_WORKSPACE = "SELECT set_config('app.workspace_id', $1, true)"
_savepoints = itertools.count(1)


def begin_statement(workspace_id: str) -> str | None:
    """`BEGIN` and the workspace's setting in one statement, or None when the id is not a
    well-formed workspace id, which alone may be written into SQL text."""
    if not is_id(workspace_id, "ws"):
        return None
    return f"BEGIN; SELECT set_config('app.workspace_id', '{workspace_id}', true)"


@contextlib.asynccontextmanager
async def scoped_transaction(conn: Executes, workspace_id: str) -> AsyncIterator[None]:
    """A transaction in which row-level security sees `workspace_id`: committed when the body
    returns, rolled back when it raises (the pool also rolls back whatever is left open when
    the connection is handed back)."""
    statement = begin_statement(workspace_id)
    await conn.execute("BEGIN" if statement is None else statement)
    try:
        if statement is None:
            await conn.execute(_SET_WORKSPACE, workspace_id)
        yield
    except BaseException:
        if not conn.is_closed():
            # The body's error is the one to raise; a broken connection is the pool's to drop.
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


@contextlib.asynccontextmanager
async def savepoint(conn: Executes) -> AsyncIterator[None]:
    """Work that can fail on its own inside a transaction: undone alone when the body raises."""
    name = f"sb_{next(_savepoints)}"
    await conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        if not conn.is_closed():
            await conn.execute(f"ROLLBACK TO SAVEPOINT {name}")  # as asyncpg's nested ones do
        raise
    await conn.execute(f"RELEASE SAVEPOINT {name}")
