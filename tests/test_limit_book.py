"""The per-workspace limits' bookkeeping (switchboard/limits/book.py) as a pure core: the minute's
quota, the burst allowance that paces it, the peers' reports and the headers, with `now` passed
in (no clock, no sockets). The same limits across real replicas: tests/test_limits.py."""

from __future__ import annotations

import pytest

from switchboard.limits.book import (
    BURST,
    MINUTE,
    OPEN_STREAMS,
    STALE_AFTER,
    WINDOW_SECONDS,
    LimitBook,
    Verdict,
    burst_capacity,
    request_key,
    seconds_to_reset,
    stream_key,
)

T0 = 1_000_000 * WINDOW_SECONDS + 5.0  # five seconds into a window
WINDOW = int(T0 // WINDOW_SECONDS)
# A burst of the whole minute: the tests about the minute's count alone.
WHOLE_MINUTE = float(WINDOW_SECONDS)


def spend(book: LimitBook, now: float, workspace_id: str = "ws_a") -> list[Verdict]:
    """Admits requests at `now` until one is refused; returns every verdict, the refusal last."""
    verdicts = [book.admit_request(workspace_id, now)]
    while verdicts[-1].allowed:
        verdicts.append(book.admit_request(workspace_id, now))
    return verdicts


# --- the minute's quota ----------------------------------------------------------------------


def test_requests_are_refused_at_the_limit_and_refusals_are_not_counted() -> None:
    book = LimitBook("me", rate_per_minute=3, max_streams=10, burst_seconds=WHOLE_MINUTE)
    verdicts = [book.admit_request("ws_a", T0) for _ in range(5)]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    assert [v.remaining for v in verdicts] == [2, 1, 0, 0, 0]
    assert {v.kind for v in verdicts} == {MINUTE}
    assert book.requests_used("ws_a", T0) == 3
    assert verdicts[0].reset == 55
    # The next window starts from zero: the refusals did not count.
    assert book.admit_request("ws_a", T0 + WINDOW_SECONDS).allowed
    assert book.admit_request("ws_b", T0).allowed  # another workspace is untouched


def test_the_other_processes_reports_count_and_this_ones_own_echo_does_not() -> None:
    book = LimitBook("me", rate_per_minute=10, max_streams=3, burst_seconds=WHOLE_MINUTE)
    book.apply(request_key(WINDOW, "ws_a", "peer1"), b"4", T0)
    book.apply(request_key(WINDOW, "ws_a", "peer2"), b"5", T0)
    book.apply(request_key(WINDOW, "ws_a", "me"), b"9", T0)  # our own report, heard back
    book.apply(request_key(WINDOW - 1, "ws_a", "peer3"), b"9", T0)  # a window that is over
    assert book.admit_request("ws_a", T0).remaining == 0
    assert not book.admit_request("ws_a", T0).allowed
    # A peer's later report replaces its earlier one (a count, not an increment).
    book.apply(request_key(WINDOW, "ws_a", "peer2"), b"5", T0)
    assert not book.admit_request("ws_a", T0).allowed


def test_streams_of_a_process_that_stopped_reporting_stop_counting() -> None:
    book = LimitBook("me", rate_per_minute=10, max_streams=3, burst_seconds=WHOLE_MINUTE)
    book.apply(stream_key("ws_a", "peer"), b"2 %.3f" % T0, T0)
    assert book.open_stream("ws_a", T0).allowed
    assert not book.open_stream("ws_a", T0 + 1).allowed
    assert book.open_stream("ws_a", T0 + STALE_AFTER + 1).allowed  # the peer went quiet
    book.close_stream("ws_a")
    book.close_stream("ws_a")
    assert book.open_streams("ws_a", T0) == 2  # only the peer's, still fresh at T0


def test_reports_carry_what_changed_and_refresh_repeats_open_streams() -> None:
    book = LimitBook("me", rate_per_minute=10, max_streams=3, burst_seconds=WHOLE_MINUTE)
    book.admit_request("ws_a", T0)
    book.admit_request("ws_a", T0)
    book.open_stream("ws_b", T0)
    assert dict(book.reports(T0)) == {
        request_key(WINDOW, "ws_a", "me"): b"2",
        request_key(WINDOW, "ws_b", "me"): b"1",  # a stream's open is a request too
        stream_key("ws_b", "me"): b"1 %.3f" % T0,
    }
    assert book.reports(T0) == []
    book.refresh()
    assert [k for k, _ in book.reports(T0 + 10)] == [stream_key("ws_b", "me")]
    book.apply("garbage", b"x", T0)  # malformed reports are ignored
    book.apply(stream_key("ws_c", "peer"), b"not a count", T0)
    book.apply(request_key(WINDOW, "ws_c", "peer"), b"-5", T0)
    assert book.open_streams("ws_c", T0) == 0
    assert book.requests_used("ws_c", T0) == 0


def test_reset_is_whole_seconds_to_the_windows_end_and_never_zero() -> None:
    assert seconds_to_reset(T0) == 55
    assert seconds_to_reset(T0 - 5.0 + 59.999) == 1


# --- the burst allowance ---------------------------------------------------------------------


def test_the_burst_is_seconds_of_the_average_rate_and_at_least_one() -> None:
    assert burst_capacity(20_000, 2.0) == 666
    assert burst_capacity(600, 2.0) == 20
    assert burst_capacity(40, 1.0) == 1  # two thirds of a request: one
    assert LimitBook("me", 600, 10, burst_seconds=2.0).burst == 20


def test_a_burst_beyond_the_allowance_is_refused_and_admitted_again_as_it_refills() -> None:
    book = LimitBook("me", rate_per_minute=600, max_streams=10, burst_seconds=2.0)  # 10/s, 20
    verdicts = spend(book, T0)
    assert len(verdicts) == 21
    refused = verdicts[-1]
    assert refused == Verdict(False, 600, 0, 1, BURST)
    assert book.requests_used("ws_a", T0) == 20  # well under the minute's 600
    # One request a tenth of a second: the average rate, whatever the client sends.
    assert not book.admit_request("ws_a", T0 + 0.05).allowed
    assert book.admit_request("ws_a", T0 + 0.11).allowed
    assert not book.admit_request("ws_a", T0 + 0.11).allowed
    assert [v.allowed for v in spend(book, T0 + 0.55)] == [True] * 4 + [False]
    # A few seconds of quiet refill the whole burst, and no more.
    assert len(spend(book, T0 + 3.0)) == 21
    assert book.admit_request("ws_b", T0 + 3.0).allowed  # another workspace has its own


def test_a_refused_burst_changes_nothing() -> None:
    book = LimitBook("me", rate_per_minute=60, max_streams=10, burst_seconds=3.0)  # 1/s, 3
    spend(book, T0)
    book.reports(T0)
    for _ in range(100):
        assert not book.admit_request("ws_a", T0 + 0.5).allowed
    assert book.requests_used("ws_a", T0) == 3
    assert book.reports(T0 + 0.5) == []
    # The refusals took no token: the next one comes a second after the burst, as it would have.
    assert book.admit_request("ws_a", T0 + 1.0).allowed


def test_retry_after_is_the_wait_for_the_next_request_in_whole_seconds() -> None:
    slow = LimitBook("me", rate_per_minute=6, max_streams=10, burst_seconds=20.0)  # 0.1/s, 2
    refused = spend(slow, T0)[-1]
    assert (refused.kind, refused.reset) == (BURST, 10)
    assert slow.admit_request("ws_a", T0 + 2.5).reset == 8  # 7.5 s to go, rounded up
    assert slow.admit_request("ws_a", T0 + 10.01).allowed


def test_the_minute_still_holds_when_the_burst_allowance_would_let_more_through() -> None:
    book = LimitBook("me", rate_per_minute=600, max_streams=10, burst_seconds=2.0)
    start = WINDOW * WINDOW_SECONDS + 0.01
    verdicts: list[Verdict] = []
    for step in range(WINDOW_SECONDS * 20 - 20):  # every 50 ms, to a second before the end
        now = start + step * 0.05
        verdicts += spend(book, now)
    # 20 at once, then 10 a second, would be 610 by now: the minute stops it at 600.
    assert sum(v.allowed for v in verdicts) == 600
    assert verdicts[-1] == Verdict(False, 600, 0, seconds_to_reset(now), MINUTE)
    assert spend(book, (WINDOW + 1) * WINDOW_SECONDS + 0.01)[0].allowed  # the next minute


def test_remaining_is_exactly_what_would_be_admitted_now() -> None:
    book = LimitBook("me", rate_per_minute=600, max_streams=10, burst_seconds=2.0)
    first = book.admit_request("ws_a", T0)
    assert (first.remaining, first.reset, first.kind) == (19, 1, BURST)
    # The minute's rest is smaller than the burst: it sets Remaining and Reset.
    book.apply(request_key(WINDOW, "ws_b", "peer"), b"590", T0, loaded=True)
    near_full = book.admit_request("ws_b", T0)
    assert near_full == Verdict(True, 600, 9, seconds_to_reset(T0), MINUTE)
    for workspace_id, at in (("ws_a", T0 + 0.35), ("ws_b", T0), ("ws_c", T0)):
        promised = book.admit_request(workspace_id, at).remaining
        verdicts = spend(book, at, workspace_id)
        assert len(verdicts) == promised + 1, workspace_id


@pytest.mark.parametrize("loaded", [False, True])
def test_other_processes_spend_the_allowance_as_their_reports_arrive(loaded: bool) -> None:
    book = LimitBook("me", rate_per_minute=60, max_streams=10, burst_seconds=10.0)  # 1/s, 10
    book.apply(request_key(WINDOW, "ws_a", "peer"), b"6", T0, loaded=loaded)
    if loaded:
        # Loaded at start: counted in the minute, but when they came is unknown; not spent.
        assert len(spend(book, T0)) == 11
        return
    assert len(spend(book, T0)) == 5
    book.apply(request_key(WINDOW, "ws_a", "peer"), b"6", T0)  # heard twice: spent once
    assert book.admit_request("ws_a", T0 + 1.0).allowed
    # What the peer admitted before this process heard of it is a debt, paid in refusals.
    book.apply(request_key(WINDOW, "ws_a", "peer"), b"9", T0 + 1.0)
    refused = book.admit_request("ws_a", T0 + 1.0)
    assert (refused.allowed, refused.kind, refused.reset) == (False, BURST, 4)
    assert book.admit_request("ws_a", T0 + 5.0).allowed
    # A new window's report counts from zero; a late one from the window before is ignored.
    book.apply(request_key(WINDOW + 1, "ws_a", "peer"), b"2", T0 + 60.0)
    book.apply(request_key(WINDOW, "ws_a", "peer"), b"12", T0 + 60.0)
    assert len(spend(book, T0 + 60.0)) == 9  # the 10 of a full bucket less the peer's 2


def test_a_debt_is_never_deeper_than_the_burst() -> None:
    book = LimitBook("me", rate_per_minute=60, max_streams=10, burst_seconds=10.0)
    book.apply(request_key(WINDOW, "ws_a", "peer"), b"50", T0)  # after a bus outage, say
    assert book.admit_request("ws_a", T0).reset == 11  # from -10 up to 1 at 1/s


def test_a_stream_needs_room_in_every_limit_and_a_refused_one_counts_nowhere() -> None:
    book = LimitBook("me", rate_per_minute=600, max_streams=2, burst_seconds=0.2)  # burst 2
    assert book.open_stream("ws_a", T0) == Verdict(True, 2, 1, 5, OPEN_STREAMS)
    # Refused by the burst: no slot taken.
    book.admit_request("ws_a", T0)
    refused = book.open_stream("ws_a", T0)
    assert (refused.allowed, refused.kind, refused.limit) == (False, BURST, 600)
    assert book.open_streams("ws_a", T0) == 1
    # Refused by the stream limit: no request counted, no token spent.
    assert book.open_stream("ws_a", T0 + 1.0).allowed
    assert book.open_stream("ws_a", T0 + 2.0) == Verdict(False, 2, 0, 5, OPEN_STREAMS)
    assert book.requests_used("ws_a", T0 + 2.0) == 3
    assert len(spend(book, T0 + 2.0)) == 3


def test_pruning_forgets_what_is_over_and_changes_no_decision() -> None:
    book = LimitBook("me", rate_per_minute=60, max_streams=10, burst_seconds=10.0)
    book.apply(request_key(WINDOW, "ws_a", "peer"), b"4", T0)
    spend(book, T0)
    book.prune(T0 + 1.0)
    assert len(spend(book, T0 + 1.0)) == 2  # pruned nothing in use: one token, then refused
    book.prune(T0 + 120.0)
    assert len(spend(book, T0 + 120.0)) == 11  # all forgotten: a fresh minute, a full bucket
