"""Keeps the listening benchmark runnable and honest: in a tiny run every event reaches every
socket in both phases, audio reaches the listeners only in the audio phase, each listener gets
its call's chunks in order with none missing, and the latency and CPU figures come out."""

from __future__ import annotations

import math

import pytest

from bench import listen

pytestmark = pytest.mark.slow


def test_listen_benchmark_accounts_for_every_event_and_chunk() -> None:
    args = listen.tiny()
    result = listen.run(args)
    assert result["sockets_listening"] == args.calls * args.listeners
    assert result["gateway_processes"] >= 1
    assert [p["kind"] for p in result["phases"]] == ["events", "events+audio"]
    for phase in result["phases"]:
        assert phase["settled"], phase
        assert phase["events_expected"] >= args.calls * args.listeners * args.rate
        assert phase["events_delivered"] == phase["events_expected"]
        assert phase["events_dropped_server"] == 0
        assert 0 < phase["event_latency_ms_p50"] <= phase["event_latency_ms_p99"]
        by_process = phase["server_cpu_by_process"]
        assert by_process["gateway"] > 0
        one_by_one = [v for k, v in by_process.items() if k.startswith("gateway ")]
        assert len(one_by_one) == result["gateway_processes"]
        assert sum(one_by_one) == pytest.approx(by_process["gateway"], abs=0.05)
        groups = [v for k, v in by_process.items() if not k.startswith("gateway ")]
        assert phase["server_cpu_seconds"] == pytest.approx(sum(groups), abs=0.05)
        assert phase["memory"]["gateway_rss_mib"] > 0
    events, audio = result["phases"]

    assert events["audio_chunks_published"] == 0
    assert events["audio_frames_received"] == 0
    assert events["audio_bytes_sent_server"] == 0
    assert math.isnan(events["audio_latency_ms_p50"])

    # Every call published a chunk each 20 ms of the phase, and each of its listeners got them
    # all, in order, 640 bytes each.
    ticks = round(args.seconds / 0.02)
    assert audio["audio_chunks_published"] == ticks * args.calls
    assert audio["audio_publish_rate_per_call"] >= 45
    expected = ticks * args.calls * args.listeners
    assert audio["audio_frames_expected"] == expected
    assert audio["audio_frames_received"] == expected
    assert audio["audio_frames_missing_in_sequence"] == 0
    assert audio["audio_listeners_without_last_chunk"] == 0
    assert audio["audio_chunks_dropped_server"] == 0
    assert audio["audio_bytes_received"] == expected * 640
    if result["metrics_cover_all_gateways"]:
        assert audio["audio_bytes_sent_server"] == expected * 640
    else:  # one gateway process's /metrics: its share
        assert 0 <= audio["audio_bytes_sent_server"] <= expected * 640
    assert 0 < audio["audio_latency_ms_p50"] <= audio["audio_latency_ms_p99"]
    assert result["out_of_order_chunks"] == 0
    assert result["wrong_size_frames"] == 0
    assert result["sockets_closed"] == 0
    assert "cores" in result["machine"]
    assert len(result["load_average_start"]) == 3
