"""Keeps the listening benchmark runnable and honest: in a tiny run every event reaches every
socket in both phases, audio reaches the listeners only in the audio phase, each listener gets
its call's chunks (or the server counts the ones it dropped), in order, and the latency
figures come out."""

from __future__ import annotations

import math

import pytest

from bench import listen

pytestmark = pytest.mark.slow


def test_listen_benchmark_accounts_for_every_event_and_chunk() -> None:
    args = listen.tiny()
    result = listen.run(args)
    assert result["sockets_listening"] == args.calls * args.listeners
    assert [p["kind"] for p in result["phases"]] == ["events", "events+audio"]
    for phase in result["phases"]:
        assert phase["settled"], phase
        assert phase["events_expected"] >= args.calls * args.listeners * args.rate
        assert (
            phase["events_delivered"] + phase["events_dropped_server"] == phase["events_expected"]
        )
        assert phase["events_delivered"] >= 0.9 * phase["events_expected"]
        assert 0 < phase["event_latency_ms_p50"] <= phase["event_latency_ms_p99"]
        assert phase["server_cpu_seconds"] > 0
        assert phase["memory"]["gateway_rss_mib"] > 0
    events, audio = result["phases"]

    assert events["audio_chunks_published"] == 0
    assert events["audio_frames_received"] == 0
    assert events["audio_bytes_sent_server"] == 0
    assert math.isnan(events["audio_latency_ms_p50"] or math.nan)

    # Every call published a chunk each 20 ms of the phase, and each of its listeners got them
    # all, or the server counted what it dropped; the bytes the server says it sent arrived.
    ticks = round(args.seconds / 0.02)
    assert audio["audio_chunks_published"] == ticks * args.calls
    assert audio["audio_publish_rate_per_call"] >= 45
    expected = ticks * args.calls * args.listeners
    assert audio["audio_frames_expected"] == expected
    received = audio["audio_frames_received"]
    assert received + audio["audio_chunks_dropped_server"] == expected
    assert received >= 0.9 * expected
    assert audio["audio_bytes_received"] == received * 640
    # /metrics must count all the audio the server wrote (every process of it, if several).
    assert audio["audio_bytes_sent_server"] == received * 640, "/metrics missed audio written"
    assert 0 < audio["audio_latency_ms_p50"] <= audio["audio_latency_ms_p99"]
    assert result["out_of_order_chunks"] == 0
    assert result["wrong_size_frames"] == 0
    assert result["sockets_closed"] == 0
    assert "cores" in result["machine"]
    assert len(result["load_average_start"]) == 3
