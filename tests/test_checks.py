"""Health, readiness and watchdog evidence judged from the daemon's parts (checks.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, cast

from forwarder.checks import WRITER_STALL_SECONDS, Checks
from forwarder.stats import State, WriterStats


class Part(SimpleNamespace):
    """A stand-in for one of the daemon's parts: only what Checks reads."""


def make_checks(**overrides: Any) -> tuple[Checks, dict[str, Any]]:
    parts: dict[str, Any] = {
        "writer": Part(failed=None, progress=0, is_alive=lambda: True),
        "writer_stats": WriterStats(),
        "engine": Part(failures=list, dead=list),
        "spool": Part(failed=None, problem=lambda: None),
        "discovery": Part(failed=None, never_listed=list),
        "consumers": Part(failed=None, is_alive=lambda: True, readiness=lambda: (True, None)),
        "fleet": None,
        "stats": [Part(state=State.CONNECTED), Part(state=State.CONNECTED)],
        "stopping": False,
    }
    parts.update(overrides)
    config = Part(metrics=Part(ready_min_connected=1.0))
    checks = Checks(
        cast(Any, config),
        writer=parts["writer"],
        writer_stats=parts["writer_stats"],
        engine=parts["engine"],
        spool=parts["spool"],
        discovery=parts["discovery"],
        consumers=parts["consumers"],
        fleet=parts["fleet"],
        stats=lambda: parts["stats"],
        running=lambda: len(parts["stats"]),
        stopping=lambda: parts["stopping"],
    )
    return checks, parts


def test_the_watchdog_evidence_stops_when_the_writer_loop_stops_turning() -> None:
    """WATCHDOG=1 goes on while the writer progresses and stops once it is wedged."""
    checks, parts = make_checks()
    start = time.monotonic()
    assert checks.progressing(start)
    parts["writer"].progress = 1
    assert checks.progressing(start + WRITER_STALL_SECONDS - 1)
    # No turn since then: just short of the limit is fine, past it is a wedged writer.
    assert checks.progressing(start + 2 * WRITER_STALL_SECONDS - 2)
    assert not checks.progressing(start + 2 * WRITER_STALL_SECONDS)
    parts["writer"].progress = 2
    assert checks.progressing(start + 2 * WRITER_STALL_SECONDS + 1)


def test_a_crashed_thread_stops_the_watchdog_and_fails_health() -> None:
    """A thread that died is named in /healthz and ends the WATCHDOG=1 evidence."""
    checks, parts = make_checks()
    parts["discovery"].failed = RuntimeError("boom")
    assert not checks.progressing(time.monotonic())
    ok, body = checks.health()
    assert not ok
    assert body["dead_threads"] == ["discovery"]


def test_stopped_threads_do_not_fail_health_while_shutting_down() -> None:
    """During shutdown the writer and monitor end on purpose: only crashes count then."""
    checks, parts = make_checks(stopping=True)
    parts["writer"].is_alive = lambda: False
    parts["consumers"].is_alive = lambda: False
    assert checks.health() == (True, {"healthy": True, "dead_threads": []})
    parts["stopping"] = False
    assert checks.health()[1]["dead_threads"] == ["consumers", "redis-writer"]


def test_readiness_names_why_redis_does_not_count_without_its_password() -> None:
    """/readyz says Redis never answered, with the last error redacted; then turns ready."""
    stats = WriterStats()
    stats.last_error = "Error connecting to redis://app:hunter2@127.0.0.1:1/0"
    checks, _ = make_checks(writer_stats=stats)
    ok, body = checks.ready()
    assert not ok
    assert body["redis_ok"] is False
    assert body["redis_reason"].startswith("no answer from Redis yet (last error:")
    assert "hunter2" not in body["redis_reason"]
    stats.last_ok_at = time.monotonic()
    ok, body = checks.ready()
    assert ok
    assert body["redis_reason"] is None


def test_readiness_needs_enough_subscriptions_connected_and_a_writable_spool() -> None:
    """One subscription down or a spool that cannot write makes /readyz 503 with the reason."""
    stats = WriterStats()
    stats.last_ok_at = time.monotonic()
    checks, parts = make_checks(writer_stats=stats)
    assert checks.ready()[0]
    parts["stats"][1].state = State.BACKOFF
    ok, body = checks.ready()
    assert not ok
    assert (body["connected"], body["subscriptions"]) == (1, 2)
    parts["stats"][1].state = State.CONNECTED
    parts["spool"].problem = lambda: "no space left on /var/lib/forwarder"
    ok, body = checks.ready()
    assert not ok
    assert body["spool_problem"] == "no space left on /var/lib/forwarder"
