"""Scenario G (issue 10): a fleet in one process, 770 sources x 13 events = 10,010 subscriptions.

Through the simulator (its own generator process, 400 B frames) and the shared Redis:
1. connect: from spawning `forwarder run` until the simulator has an open holder on every
   slot, and the peak connection attempts in any one second;
2. idle: RSS, threads and CPU over `idle_seconds`, and what GET /metrics and /status cost;
3. traffic: each of `traffic` (frames/s aggregate, seconds) spread over every subscription in
   turn (one frame per slot per round); forward latency = the Redis entry ID's time (when
   the XADD ran; 1 ms resolution) - the wall time the generator noted just before sending
   the frame's batch; exact-once in order over every stream. Then one more phase at the last
   rate while /metrics and /status are timed (a slow scrape holds the interpreter lock, so
   the latency phases run without one);
4. storm: every connection dropped at once (FIN, no close frame); time until every slot has
   an open holder again, and the peak attempts per second.
"""

from __future__ import annotations

import bisect
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from bench.fixture import Generator
from bench.fixture import forwarder_config as write_forwarder_config
from bench.procs import PAUSE, PYTHON, CpuMeter, Procs, ProcStat
from bench.scrape import measure_endpoints
from forwarder.events import SENT_EVENTS
from forwarder_sim.payloads import seq_of


@dataclass(frozen=True)
class FleetScale:
    sources: int
    events: int
    idle_seconds: float
    traffic: tuple[tuple[float, float], ...]  # (frames/s aggregate, seconds) phases
    scrape_seconds: float  # traffic while /metrics and /status are timed
    frame_bytes: int = 400
    timeout: float = 180.0  # for connecting, coming back, draining


FLEET_FULL = FleetScale(770, 13, 60.0, ((5_000.0, 15.0), (20_000.0, 30.0)), 20.0)
FLEET_QUICK = FleetScale(5, 13, 1.0, ((650.0, 1.0),), 1.0)


def _attempts(summary: dict[str, int]) -> int:
    return summary["connections_total"] + summary["rejected"] + summary["bad_requests"]


def _peak_per_second(samples: Sequence[tuple[float, int]]) -> float:
    """The most attempts in any window of (at least) one second starting at a sample."""
    peak = 0.0
    for i, (ti, ci) in enumerate(samples):
        tj, cj = next(((t, c) for t, c in samples[i + 1 :] if t - ti >= 1.0), samples[-1])
        peak = max(peak, (cj - ci) / max(1.0, tj - ti))
    return round(peak, 1)


def _until_all_open(gen: Generator, total: int, timeout: float) -> tuple[float, float, int]:
    """Poll until every slot has an open holder: (seconds, peak attempts/s, attempts)."""
    first = _attempts(gen.summary())
    samples = [(0.0, 0)]
    t0 = time.monotonic()
    while True:
        PAUSE.wait(0.1)
        summary = gen.summary()
        elapsed = time.monotonic() - t0
        samples.append((elapsed, _attempts(summary) - first))
        if summary["holders_open"] >= total:
            return round(elapsed, 2), _peak_per_second(samples), samples[-1][1]
        if elapsed > timeout:
            raise TimeoutError(f"{summary['holders_open']} of {total} connected after {timeout}s")


@dataclass
class _Stream:
    key: str
    event: str
    next_id: str = "-"
    last_seq: int = 0


@dataclass
class FleetCheck:
    """Exact-once, in order, over every stream, continuing from one traffic phase to the next;
    latencies from each phase's send times."""

    streams: list[_Stream]
    entries: int = 0
    lost: int = 0
    duplicated_or_reordered: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    sent_ms: list[float] = field(default_factory=list)  # parallel to latencies_ms

    def check(self, r: redis.Redis, sends: dict[str, list[list[float]]]) -> None:
        self.latencies_ms = []
        self.sent_ms = []
        for start in range(0, len(self.streams), 500):
            chunk = self.streams[start : start + 500]
            pipe = r.pipeline(transaction=False)
            for s in chunk:
                pipe.execute_command("XRANGE", s.key, s.next_id, "+")  # type: ignore[no-untyped-call]
            for s, entries in zip(chunk, pipe.execute(), strict=True):
                self._stream(s, entries, sends.get(s.key.replace(":", "\0", 1), []))

    def _stream(self, s: _Stream, entries: Any, sends: list[list[float]]) -> None:
        seqs = [int(seq) for _, seq in sends]
        for entry_id, fields in entries:
            seq = seq_of(s.event, fields[1])  # both writers put `data` first
            if seq == s.last_seq + 1:
                s.last_seq = seq
            elif seq <= s.last_seq:
                self.duplicated_or_reordered += 1
                continue
            else:
                self.lost += seq - s.last_seq - 1
                s.last_seq = seq
            n = bisect.bisect_left(seqs, seq)
            if n < len(sends):
                sent_ms = sends[n][0] * 1000.0
                self.latencies_ms.append(int(entry_id.split(b"-")[0]) - sent_ms)
                self.sent_ms.append(sent_ms)
        self.entries += len(entries)
        if entries:
            s.next_id = "(" + entries[-1][0].decode()

    def tail(self, expected: dict[str, int]) -> None:
        """Frames the simulator delivered past the last one found in Redis are lost too."""
        for s in self.streams:
            last = expected.get(s.key.replace(":", "\0", 1), s.last_seq)
            if last > s.last_seq:
                self.lost += last - s.last_seq
                s.last_seq = last


def _percentile(values: list[float], q: float) -> float:
    return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else -1.0


def _slowest_seconds(sent_ms: list[float], latencies_ms: list[float]) -> list[list[float]]:
    """The five seconds (from the phase's first send) whose frames waited longest:
    [offset s, max ms, frames over 50 ms]. Stalls that recur every N seconds show here."""
    if not sent_ms:
        return []
    first = min(sent_ms)
    worst: dict[int, list[float]] = {}
    for sent, latency in zip(sent_ms, latencies_ms, strict=True):
        second = worst.setdefault(int((sent - first) / 1000.0), [0.0, 0.0])
        second[0] = max(second[0], latency)
        second[1] += latency > 50.0
    top = sorted(worst.items(), key=lambda kv: -kv[1][0])[:5]
    return [[float(k), round(v[0], 1), v[1]] for k, v in sorted(top)]


def _xlen_sum(r: redis.Redis, keys: list[str]) -> int:
    total = 0
    for start in range(0, len(keys), 1000):
        pipe = r.pipeline(transaction=False)
        for key in keys[start : start + 1000]:
            pipe.xlen(key)
        total += sum(int(n) for n in pipe.execute())
    return total


def _traffic(
    gen: Generator,
    r: redis.Redis,
    base: str,
    stat: ProcStat,
    check: FleetCheck,
    instances: list[str],
    events: list[str],
    rate: float,
    seconds: float,
    timeout: float,
    scrape: bool = False,
) -> dict[str, Any]:
    keys = [s.key for s in check.streams]
    in_redis = _xlen_sum(r, keys)
    reply: list[dict[str, Any]] = []
    sender = threading.Thread(
        target=lambda: reply.append(
            gen.command("spread", instances=instances, events=events, rate=rate, seconds=seconds)
        ),
        name="spread",
        daemon=True,
    )
    meter = CpuMeter({"forwarder": stat, "generator": gen.stat})
    meter.start()
    sender.start()
    endpoints: dict[str, Any] = {}
    if scrape:
        PAUSE.wait(min(3.0, seconds / 4))
        endpoints = measure_endpoints(base, runs=3)  # while the traffic flows
    sender.join(seconds + timeout)
    if not reply:
        raise RuntimeError("the generator did not answer the spread command")
    cpu = meter.stop()
    sends: dict[str, list[list[float]]] = reply[0]["sends"]
    delivered = int(reply[0]["delivered"])
    target = in_redis + delivered
    deadline = time.monotonic() + timeout
    while _xlen_sum(r, keys) < target and time.monotonic() < deadline:
        PAUSE.wait(0.2)
    PAUSE.wait(0.2)  # let a straggler (a duplicate would be one) land
    before = (check.entries, check.lost, check.duplicated_or_reordered)
    check.check(r, sends)
    check.tail({key: int(s[-1][1]) for key, s in sends.items() if s})
    latencies = sorted(check.latencies_ms)
    return {
        "rate": rate,
        "seconds": seconds,
        "delivered": delivered,
        "generator_max_behind_s": reply[0]["max_behind_s"],
        "entries": check.entries - before[0],
        "lost": check.lost - before[1],
        "duplicated_or_reordered": check.duplicated_or_reordered - before[2],
        "p50_ms": _percentile(latencies, 0.50),
        "p99_ms": _percentile(latencies, 0.99),
        "max_ms": round(latencies[-1], 2) if latencies else -1.0,
        "mean_ms": round(statistics.fmean(latencies), 2) if latencies else -1.0,
        "slowest_seconds": _slowest_seconds(check.sent_ms, check.latencies_ms),
        "cpu_percent": cpu,
        **({"endpoints_under_traffic": endpoints} if scrape else {}),
    }


def fleet_scenario(
    procs: Procs, gen: Generator, redis_url: str, r: redis.Redis, scale: FleetScale
) -> dict[str, Any]:
    """Scenario G. `gen` is a fresh generator with 400 B frames; `r` reads raw replies."""
    instances = [f"g{n:03d}" for n in range(scale.sources)]
    events = list(SENT_EVENTS[: scale.events])
    total = len(instances) * len(events)
    config, port = write_forwarder_config(
        procs.workdir,
        "fleet-forwarder",
        redis_url,
        gen.ws_url,
        dict.fromkeys(instances, events),
        "{source}:{event}",
    )
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {
        "subscriptions": total,
        "frame_bytes": scale.frame_bytes,
        "metrics_detail": "event",  # the default: the config sets no [metrics] detail
    }
    proc = procs.spawn(
        "fleet-forwarder", [PYTHON, "-m", "forwarder", "run", "--config", str(config)]
    )
    stat = ProcStat(proc.pid)
    try:
        seconds, peak, attempts = _until_all_open(gen, total, scale.timeout)
        result["connect"] = {"all_connected_s": seconds, "peak_attempts_per_s": peak}
        result["connect"]["attempts"] = attempts
        PAUSE.wait(2.0)  # let the start-up burst of allocations and logging settle
        meter = CpuMeter({"forwarder": stat, "generator": gen.stat})
        meter.start()
        PAUSE.wait(scale.idle_seconds)
        cpu = meter.stop()
        result["idle"] = {
            "seconds": scale.idle_seconds,
            "cpu_percent": cpu["forwarder"],
            "generator_cpu_percent": cpu["generator"],
            "rss_mb": round(stat.rss() / 1e6, 1),
            "peak_rss_mb": round(stat.peak_rss() / 1e6, 1),
            "threads": stat.threads(),
            "endpoints": measure_endpoints(base, runs=3),
        }
        check = FleetCheck([_Stream(f"{i}:{e}", e) for i in instances for e in events])
        result["traffic"] = [
            _traffic(gen, r, base, stat, check, instances, events, rate, secs, scale.timeout)
            for rate, secs in scale.traffic
        ]
        last_rate = scale.traffic[-1][0]
        result["scrape_under_traffic"] = _traffic(
            gen,
            r,
            base,
            stat,
            check,
            instances,
            events,
            last_rate,
            scale.scrape_seconds,
            scale.timeout,
            scrape=True,
        )
        result["peak_rss_mb"] = round(stat.peak_rss() / 1e6, 1)
        dropped = int(gen.control("drop")["connections"])
        seconds, peak, attempts = _until_all_open(gen, total, scale.timeout)
        result["storm"] = {
            "dropped_connections": dropped,
            "all_back_s": seconds,
            "peak_attempts_per_s": peak,
            "attempts": attempts,
        }
        t0 = time.monotonic()
        code = procs.stop(proc, timeout=30.0)
        result["shutdown"] = {"seconds": round(time.monotonic() - t0, 2), "exit_code": code}
    finally:
        procs.stop(proc)
    result["check"] = {
        "entries": check.entries,
        "lost": check.lost,
        "duplicated_or_reordered": check.duplicated_or_reordered,
    }
    return result
