"""Keeps the benchmarks runnable: a tiny fan-out run must deliver every frame it promises, and a
tiny resume storm must lose and duplicate nothing across the replica's restart."""

from __future__ import annotations

import argparse

import pytest

from bench import resume_storm
from bench.fanout import run

pytestmark = pytest.mark.slow


def test_fanout_benchmark_runs_and_accounts_for_every_frame() -> None:
    result = run(
        argparse.Namespace(
            streams=20,
            calls=2,
            rate=10.0,
            seconds=1.0,
            kind="mixed",
            workers=1,
            server_workers=2,
            burst=True,
        )
    )
    assert result["streams"] == 20
    assert result["frames_delivered"] + result["frames_dropped_server"] == result["frames_expected"]
    assert result["frames_expected"] >= 100
    assert result["latency_ms_p50"] > 0
    assert "cores" in result["machine"]
    # The CPU is split by process, each named by the serve, and the parts add up to the whole.
    by_process = result["server_cpu_by_process"]
    assert {"sb-api-1", "sb-api-2"} <= by_process.keys()
    assert abs(sum(by_process.values()) - result["server_cpu_seconds"]) < 0.05


def test_resume_storm_benchmark_loses_and_duplicates_nothing() -> None:
    result = resume_storm.run(
        argparse.Namespace(
            streams=40,
            calls=2,
            rate=10.0,
            missed=50,
            warmup=1.0,
            after=2.0,
            reconnect="storm",
            drain_seconds=1.0,
            timeout=60.0,
            workers=1,
            server_log=None,
        )
    )
    assert result["streams"] == 40
    assert result["streams_not_caught_up"] == 0
    assert result["streams_incomplete_at_end"] == 0
    assert result["lost"] == 0
    assert result["lost_holes"] == 0
    assert result["duplicated"] == 0
    assert result["out_of_order"] == 0
    assert result["unexpected_frames"] == 0
    assert result["cursor_regressions"] == 0
    assert result["frames_received"] == result["frames_expected"]
    # Every client came back with its cursor, each about 50 finals behind, and the server
    # replayed what they missed.
    assert result["client_resumes_with_cursor"] == 40
    assert result["server_resumes"] == 40
    assert result["missed_per_stream_min_p50_max"][0] >= 40
    assert result["server_frames_replayed"] >= 40 * 40
    assert "cores" in result["machine"]


def test_tenants_benchmark_runs_and_the_victim_gets_every_frame() -> None:
    from bench import tenants

    args = tenants.parser().parse_args(
        [
            *("--streams", "20", "--calls", "2", "--rate", "5", "--seconds", "2"),
            *("--rounds", "1", "--flood-streams", "30", "--flood-rps", "200"),
            *("--flood-processes", "1", "--flood-connections", "2"),
        ]
    )
    result = tenants.run(args)
    quiet, flood = result["phases"]
    for phase in (quiet, flood):
        delivered, expected = map(int, phase["victim_frames"].split("/"))
        assert delivered == expected > 0
        assert phase["victim_rest_ms_p50"] > 0
    assert flood["flooder_streams_open"] == 30 and flood["flooder_requests_admitted"] > 0
    assert quiet["flooder_requests_admitted"] == 0
    # The flooder's client is measured too: its load shares the box with the server's.
    assert flood["flooder_client_cpu_seconds"] > 0 == quiet["flooder_client_cpu_seconds"]
    assert set(result["ratio_flood_over_quiet"]) >= {"victim_stream_ms_p99"}
