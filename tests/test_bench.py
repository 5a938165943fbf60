"""Smoke tests of the benchmarks: `python -m bench.run --quick` and `bench.handshakes` work.

It checks that every scenario produces sane numbers and that no frame was lost, duplicated
or reordered on the way to Redis; it does not judge speed (that is `make bench`).
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the quick suite once for all the tests of this module."""
    output = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data: dict[str, Any] = json.loads(output.read_text())
    return data


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_scenario_reports_positive_finite_numbers(results: dict[str, Any]) -> None:
    """Each scenario A-G is in the JSON, its headline numbers are positive and finite."""
    assert results["quick"] is True
    for kind in ("forwarder", "baseline", "ceiling"):
        assert results["A"][kind]["frames_per_s"] > 0
        assert results["C"][kind]["frames_per_s"] > 0
        for size in ("2000", "13000"):
            assert results["B"][size][kind]["frames_per_s"] > 0
            assert results["B"][size][kind]["mb_per_s"] > 0
    assert results["A"]["ratio_vs_baseline"] > 0
    for kind in ("forwarder", "baseline"):
        latency = results["D"][kind]
        assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert results["E"]["connect_all_s"] > 0
    assert results["E"]["rss_mb"] > 0
    assert results["E"]["idle_cpu_percent"] >= 0
    assert results["F"]["dropped_connections"] == results["subscriptions"]
    assert results["F"]["all_back_s"] > 0
    assert results["F"]["peak_attempts_per_s"] > 0
    fleet = results["G"]
    assert fleet["subscriptions"] == 5 * 13
    assert fleet["connect"]["all_connected_s"] > 0
    assert fleet["storm"]["dropped_connections"] == fleet["subscriptions"]
    (phase,) = fleet["traffic"]
    assert phase["entries"] == phase["delivered"] > 0
    assert 0 <= phase["p50_ms"] <= phase["p99_ms"] <= phase["max_ms"]
    assert fleet["idle"]["endpoints"]["metrics_series"] > 0
    for scenario in ("A", "B", "C", "D", "E", "F", "G"):
        assert all(math.isfinite(n) for n in _numbers(results[scenario])), scenario
    assert set(results["targets"]) >= {"A_fps", "A_ratio", "B_mbps", "D_p99", "E_rss", "F_peak"}
    assert {"G_connect", "G_lost", "G_back", "G_peak"} <= set(results["targets"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_frame_lost_duplicated_or_reordered(results: dict[str, Any]) -> None:
    """Redis holds exactly the simulator's frames, once each and in order, for every client."""
    verification = results["verification"]
    assert verification["entries"] > 0
    assert verification["lost"] == 0
    assert verification["duplicated_or_reordered"] == 0
    assert verification["dropped"] == 0
    assert verification["dead_lettered"] == 0
    clients = {check["client"].split("-")[0] for check in verification["checks"]}
    assert clients == {"forwarder", "baseline", "ceiling"}


def test_the_handshake_benchmark_opens_every_connection_it_counts() -> None:
    """`python -m bench.handshakes` at a tiny scale: 2 threads x 3 handshakes, all opened."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.handshakes", "--threads", "2", "--count", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result["handshakes"] == 6
    assert result["per_second"] > 0
    assert all(math.isfinite(result[k]) and result[k] >= 0 for k in ("user_ms", "system_ms"))


def test_the_generator_pauses_the_garbage_collector_only_while_it_paces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A paced phase runs with the cyclic collector off (its pauses would count as forward
    latency) and leaves it as it found it, also when the phase fails."""
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is run from the checkout, not installed
    from bench.generator import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a phase that fails")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # someone else's choice stays
    finally:
        gc.enable()
