"""bench.metrics_scale at toy size: the command and the measure() scenario G imports work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_counts_series_and_times_both_endpoints_in_both_modes(
    tmp_path: Path,
) -> None:
    """2 sources x 13 events: every sample line counted (34 per subscription in detail
    "subscription"), both endpoints timed idle and busy, the default's targets judged."""
    output = tmp_path / "out.json"
    argv = ["--sources", "2", "--runs", "2", "--rate", "2000", "--output", str(output)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.metrics_scale", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(output.read_text())
    assert data == json.loads(proc.stdout)
    event, detail = data["event"], data["subscription"]
    assert event["subscriptions"] == detail["subscriptions"] == 26
    assert set(event["targets_met"]) == {"series", "metrics_seconds", "status_seconds"}
    assert 26 * 34 < detail["busy"]["series"] < 26 * 34 + 200
    assert event["busy"]["series"] < detail["busy"]["series"]
    for mode in (event, detail):
        for phase in ("idle", "busy"):
            assert len(mode[phase]["metrics_runs"]) == len(mode[phase]["status_runs"]) == 2
            assert mode[phase]["metrics_seconds"] > 0
            assert mode[phase]["status_bytes"] > 1000
        assert mode["busy"]["frames_per_s"] > 0
