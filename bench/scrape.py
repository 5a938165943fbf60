"""What /metrics and /status cost at scale: series count, bytes, render time (medians).

`measure_endpoints("http://127.0.0.1:PORT")` times GET /metrics and GET /status a few times
each. Scenario G calls it at 10,010 subscriptions, idle and under traffic. (The metrics work
of issue 15 brings its own `bench.metrics_scale.measure`; this one only needs HTTP.)
"""

from __future__ import annotations

import collections
import statistics
import time
import urllib.error
import urllib.request
from typing import Any


def _get(url: str, timeout: float) -> tuple[float, bytes]:
    started = time.monotonic()
    try:
        # S310: only ever http://127.0.0.1 URLs built by the benchmark itself.
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            body = response.read()
    except urllib.error.HTTPError as exc:  # /status answers; a 503 on /readyz is no error here
        body = exc.read()
    return time.monotonic() - started, body


def measure_endpoints(base: str, runs: int = 3, timeout: float = 120.0) -> dict[str, Any]:
    """Median and worst time of GET /metrics and GET /status, series and bytes."""
    out: dict[str, Any] = {}
    try:
        metrics = [_get(f"{base}/metrics", timeout) for _ in range(runs)]
        body = metrics[-1][1]
        names = [
            line.split(b"{", 1)[0].split(b" ", 1)[0].decode()
            for line in body.splitlines()
            if line and not line.startswith(b"#")
        ]
        out["metrics_series"] = len(names)
        # Where the series come from: the five largest metric names.
        out["metrics_largest"] = dict(collections.Counter(names).most_common(5))
        out["metrics_bytes"] = len(body)
        out["metrics_s_median"] = round(statistics.median(t for t, _ in metrics), 3)
        out["metrics_s_max"] = round(max(t for t, _ in metrics), 3)
    except OSError as exc:
        out["metrics_error"] = f"{type(exc).__name__}: {exc}"
    try:
        status = [_get(f"{base}/status", timeout) for _ in range(runs)]
        out["status_bytes"] = len(status[-1][1])
        out["status_s_median"] = round(statistics.median(t for t, _ in status), 3)
        out["status_s_max"] = round(max(t for t, _ in status), 3)
    except OSError as exc:
        out["status_error"] = f"{type(exc).__name__}: {exc}"
    return out
