"""Keeps the fan-out benchmark runnable: a tiny run must deliver every frame it promises."""

from __future__ import annotations

import argparse

import pytest

from bench.fanout import run

pytestmark = pytest.mark.slow


def test_fanout_benchmark_runs_and_accounts_for_every_frame() -> None:
    result = run(
        argparse.Namespace(streams=20, calls=2, rate=10.0, seconds=1.0, kind="mixed", workers=1)
    )
    assert result["streams"] == 20
    assert result["frames_delivered"] + result["frames_dropped_server"] == result["frames_expected"]
    assert result["frames_expected"] >= 100
    assert result["latency_ms_p50"] > 0
    assert "cores" in result["machine"]
