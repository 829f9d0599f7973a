"""The pure parts of resume: cursors, and the outbox's gap notices and seam (SPEC 5.4)."""

from __future__ import annotations

import asyncio

from switchboard.events import EVENTS_STREAM, TRANSCRIPTS_STREAM
from switchboard.live.cursor import Cursor, parse_cursor
from switchboard.live.frames import Ending, Terminal, sse_gap
from switchboard.live.outbox import Outbox


def test_cursors_parse_only_their_own_stream() -> None:
    assert parse_cursor("t42", TRANSCRIPTS_STREAM) == Cursor(TRANSCRIPTS_STREAM, 42)
    assert str(Cursor(EVENTS_STREAM, 7)) == "e7"
    for text in ("e42", "t0", "t-1", "t42\n", "42", "", "t" + "9" * 20, "evt_abc"):
        assert parse_cursor(text, TRANSCRIPTS_STREAM) is None, text


async def test_drops_are_announced_before_the_next_frame_or_once_caught_up() -> None:
    outbox = Outbox(2, gap=sse_gap)
    assert outbox.offer(b"a", 1, "e1") and outbox.offer(b"b", 2, "e2")
    assert not outbox.offer(b"c", 3, "e3") and not outbox.offer(b"d", 4, "e4")
    assert await outbox.next() == b"a"
    assert outbox.offer(b"e", 5, "e5")  # room again: the notice goes first
    assert await outbox.next() == b"b"
    assert await outbox.next() == sse_gap(2, "e2")
    assert await outbox.next() == b"e"
    # Drops with nothing after them are announced as soon as the writer has caught up.
    outbox.offer(b"f", 6, "e6")
    outbox.offer(b"g", 7, "e7")
    assert not outbox.offer(b"h", 8, "e8")
    assert [await outbox.next(), await outbox.next()] == [b"f", b"g"]
    assert await asyncio.wait_for(outbox.next(), 1) == sse_gap(1, "e7")
    # ... and before the end of the stream, too.
    outbox.offer(b"i", 9, "e9")
    outbox.offer(b"j", 10, "e10")
    assert not outbox.offer(b"k", 11, "e11")
    outbox.end(Terminal(Ending.CALL_COMPLETED))
    assert [await outbox.next() for _ in range(3)] == [b"i", b"j", sse_gap(1, "e10")]
    assert await outbox.next() == Terminal(Ending.CALL_COMPLETED)


async def test_the_seam_skips_what_a_replay_sent_and_a_replay_reads_on_past_drops() -> None:
    outbox = Outbox(3, gap=sse_gap)
    for seq in (5, 6, 7):
        outbox.offer(b"%d" % seq, seq, f"e{seq}")
    assert not outbox.offer(b"8", 8, "e8")
    assert outbox.discard_for_replay()  # dropped while replaying: read on, forget what waits
    assert len(outbox) == 0 and outbox.owed_gap == 0
    assert not outbox.discard_for_replay()
    for seq in (8, 9, 10):
        outbox.offer(b"%d" % seq, seq, f"e{seq}")
    outbox.skip_through = 9  # the replay sent up to 9
    assert await outbox.next() == b"10"
