"""Whether the current request has begun to commit: the line after which it must not be
answered with an error (SPEC 6, "No phantom writes").

The write deadline may cancel a request at any await. Cancelled before its transaction commits,
the request changed nothing and a 504 tells the truth; cancelled while its COMMIT is in flight
or after it, the request may have changed something, and an error would be a phantom write. So
`Database.workspace()` reports here just before it commits, and the deadline asks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_on_commit: ContextVar[Callable[[], None] | None] = ContextVar(
    "switchboard_on_commit", default=None
)


def commit_starting() -> None:
    """Called by the database layer just before a transaction commits."""
    listener = _on_commit.get()
    if listener is not None:
        listener()


@contextmanager
def reporting_commits(listener: Callable[[], None]) -> Iterator[None]:
    """Within this block (and the tasks it starts), `listener()` runs before every commit."""
    token = _on_commit.set(listener)
    try:
        yield
    finally:
        _on_commit.reset(token)
