"""/metrics and /status at fleet scale (issue 15): series count, render time, /status time.

    .venv/bin/python -m bench.metrics_scale [--sources 770] [--runs 5] [--rate 20000]
                                            [--modes event,subscription] [--output FILE]

Builds the daemon's real observation path without the sockets: 770 sources x 13 events of
SubscriptionStats, a real DiskSpool holding their routes, the collector, the /status
report and the HTTP server, on a free loopback port. Two threads play the subscribers and
the writer, bumping the counters of random subscriptions (received, bytes, last message,
forwarded, latency) at `--rate` frames/s in total; 1 % of the subscriptions are down (half
of those rejected with 401), so the problem series and the unhealthy rows are exercised.
Then `measure()` fetches /metrics and /status `--runs` times and reports medians, in each
detail mode, once idle and once while the counters move. Prints JSON.

`measure(url)` is importable, so that the fleet scenario of `bench.run` can point it at a
real daemon: `bench.metrics_scale.measure("http://127.0.0.1:9108")`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from forwarder.config import DEFAULT_STALL_AFTER
from forwarder.events import SENT_EVENTS
from forwarder.http import HttpServer
from forwarder.metrics import ForwarderCollector, build_registry, source_labelled
from forwarder.problems import HealthPolicy, ProblemFinder
from forwarder.spool import DiskSpool, Route
from forwarder.stats import State, SubscriptionStats, WriterStats
from forwarder.status import StatusReport

TARGETS = {"series": 50_000, "metrics_seconds": 1.0, "status_seconds": 0.2}
PAUSE = threading.Event()  # never set: the pacing of the traffic threads


def _get(url: str, timeout: float) -> tuple[float, bytes]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
        body: bytes = response.read()
    return time.perf_counter() - started, body


def measure(url: str, runs: int = 5, timeout: float = 120.0) -> dict[str, Any]:
    """GET url/metrics and url/status `runs` times each; medians of the wall times.

    `url` is the daemon's metrics base URL, e.g. "http://127.0.0.1:9108". Returns
    {"series", "metrics_seconds", "metrics_bytes", "status_seconds", "status_bytes",
    "metrics_runs", "status_runs"}; series counts the sample lines of the last scrape.
    """
    base = url.rstrip("/")
    metric_times: list[float] = []
    status_times: list[float] = []
    body = b""
    status = b""
    for _ in range(runs):
        elapsed, body = _get(base + "/metrics", timeout)
        metric_times.append(elapsed)
        elapsed, status = _get(base + "/status", timeout)
        status_times.append(elapsed)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return {
        "series": series,
        "metrics_seconds": round(statistics.median(metric_times), 4),
        "metrics_bytes": len(body),
        "status_seconds": round(statistics.median(status_times), 4),
        "status_bytes": len(status),
        "metrics_runs": [round(t, 4) for t in metric_times],
        "status_runs": [round(t, 4) for t in status_times],
    }


class Fleet:
    """Stats, spool, collector, /status and the HTTP server for sources x 13 events."""

    def __init__(self, directory: Path, sources: int, detail: str) -> None:
        names = [f"wa{n:04d}" for n in range(sources)]
        routes = [Route(s, e, f"{s}:{e}", f"{s}:{e}:dlq") for s in names for e in SENT_EVENTS]
        self.spool = DiskSpool(directory, routes, max_bytes=1 << 30)
        now = time.time()
        self.stats = [SubscriptionStats(r.source, r.event, r.stream) for r in routes]
        rand = random.Random(15)
        for n, s in enumerate(self.stats):
            s.state = State.CONNECTED
            s.connected_since = now - 3600
            s.last_message_at = now - rand.uniform(0, 60)
            s.blind = (rand.uniform(0, 5), None)
            if n % 100 == 0:  # 1 %: down, half of them rejected with 401
                s.state = State.BACKOFF
                s.connected_since = None
                s.last_handshake_status = "401" if n % 200 == 0 else "502"
                s.last_error = f"HTTP {s.last_handshake_status}"
                s.blind = (0.0, now - 300)
        writer = WriterStats()
        writer.last_ok_at = time.monotonic()
        problems = ProblemFinder(HealthPolicy(dict(DEFAULT_STALL_AFTER), started_at=now - 3600))
        collector = ForwarderCollector(
            lambda: self.stats,
            writer,
            self.spool,
            problems,
            detail=detail,
            by_source=source_labelled("auto", sources),
        )
        report = StatusReport(
            lambda: self.stats,
            self.spool,
            writer,
            problems,
            lambda: False,
            "redis://127.0.0.1:6379/0",
            str(directory),
            now - 3600,
        )
        self.http = HttpServer(
            "127.0.0.1",
            0,
            build_registry(collector),
            lambda: (True, {}),
            lambda: (True, {}),
            report.build,
        )
        self.http.start()
        self.url = f"http://127.0.0.1:{self.http.port}"

    def close(self) -> None:
        self.http.stop()
        self.http.join(5.0)
        self.spool.close()

    @contextmanager
    def traffic(self, rate: float, threads: int = 2) -> Iterator[list[int]]:
        """Bump counters at `rate` frames/s in total, the way subscribers and the writer do;
        yields [frames bumped], final once the block ends."""
        stop = threading.Event()
        done = [0]
        per_thread = rate / threads
        chunk = max(1, int(per_thread / 100))  # 100 chunks per second per thread

        def bump(seed: int) -> None:
            rand = random.Random(seed)
            stats = self.stats
            started = time.monotonic()
            sent = 0
            while not stop.is_set():
                for _ in range(chunk):
                    s = stats[rand.randrange(len(stats))]
                    s.received += 1
                    s.received_bytes += 400
                    s.last_message_at = time.time()
                    s.forwarded += 1
                    s.latency.observe(rand.uniform(0.0005, 0.02))
                sent += chunk
                ahead = sent / per_thread - (time.monotonic() - started)
                if ahead > 0:
                    PAUSE.wait(ahead)
            done[0] += sent

        workers = [threading.Thread(target=bump, args=(n,), daemon=True) for n in range(threads)]
        for worker in workers:
            worker.start()
        started = time.monotonic()
        try:
            yield done
        finally:
            stop.set()
            for worker in workers:
                worker.join(10.0)
            done.append(int(done[0] / max(1e-9, time.monotonic() - started)))


def scenario(sources: int, detail: str, runs: int, rate: float) -> dict[str, Any]:
    """Idle and busy measurements of one detail mode."""
    with tempfile.TemporaryDirectory(prefix="forwarder-metrics-bench-") as tmp:
        fleet = Fleet(Path(tmp), sources, detail)
        try:
            idle = measure(fleet.url, runs)
            with fleet.traffic(rate) as done:
                busy = measure(fleet.url, runs)
            busy["frames_per_s"] = done[1]
        finally:
            fleet.close()
    result: dict[str, Any] = {"subscriptions": len(fleet.stats), "idle": idle, "busy": busy}
    if detail == "event":
        result["targets_met"] = {
            "series": busy["series"] <= TARGETS["series"],
            "metrics_seconds": busy["metrics_seconds"] <= TARGETS["metrics_seconds"],
            "status_seconds": busy["status_seconds"] <= TARGETS["status_seconds"],
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.metrics_scale", description=__doc__)
    parser.add_argument("--sources", type=int, default=770, help="x 13 events (default 770)")
    parser.add_argument("--runs", type=int, default=5, help="fetches per measurement")
    parser.add_argument("--rate", type=float, default=20_000.0, help="frames/s while busy")
    parser.add_argument("--modes", default="event,subscription")
    parser.add_argument("--output", help="also write the JSON here")
    ns = parser.parse_args(argv)
    results: dict[str, Any] = {
        "targets": TARGETS,
        "sources": ns.sources,
        "events": 13,
        "cpus": os.cpu_count(),
        # Other work on the machine shows here: the times are wall times.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    for detail in ns.modes.split(","):
        # The per-subscription mode takes tens of seconds per scrape at this size: fewer runs.
        runs = ns.runs if detail == "event" else min(ns.runs, 2)
        results[detail] = scenario(ns.sources, detail, runs, ns.rate)
        sys.stderr.write(f"{detail}: {json.dumps(results[detail]['busy'])}\n")
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(results, indent=2)
    sys.stdout.write(text + "\n")
    if ns.output:
        Path(ns.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
