"""A restart of forwarder is a gap: the marks file, and the `restart` gap of the next start,
after a clean stop and after kill -9."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from forwarder.daemon import Forwarder
from forwarder.lastseen import FILE_NAME, SAVE_INTERVAL, LastSeen, heard_until
from forwarder.stats import SubscriptionStats
from forwarder_sim import Simulator
from tests.conftest import ConfigFactory
from tests.helpers import wait_for, xrange

UP = "messages.upsert"


def stats(source: str, event: str, blind_since: float | None) -> SubscriptionStats:
    s = SubscriptionStats(source, event, f"{source}:{event}")
    s.blind = (0.0, blind_since)
    return s


def test_marks_are_now_while_receiving_and_the_blind_start_otherwise(tmp_path: Path) -> None:
    """Saved marks: the save time for a receiving subscription, the start of the open blind
    interval for one that is not; leftovers of the spool are not saved."""
    book = LastSeen(tmp_path)
    leftover = stats("old", UP, None)
    leftover.configured = False
    book.save([stats("a", UP, None), stats("b", UP, 1000.5), leftover], now=2000.25)
    assert book.load() == {("a", UP): 2000.25, ("b", UP): 1000.5}
    assert heard_until(stats("c", UP, 7.0), 9.0) == 7.0


def test_a_missing_file_is_a_first_start_and_a_damaged_one_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No file: no marks, quietly. Garbage: no marks and a WARNING naming the file."""
    book = LastSeen(tmp_path)
    assert book.load() == {}
    assert caplog.records == []
    (tmp_path / FILE_NAME).write_bytes(b"{not json")
    caplog.set_level(logging.WARNING)
    assert book.load() == {}
    assert FILE_NAME in caplog.text


def restart_gap(client: redis.Redis) -> dict[str, str]:
    gaps = [
        {k.decode(): v.decode() for k, v in f.items()} for _, f in xrange(client, "forwarder:gaps")
    ]
    (gap,) = [g for g in gaps if g["cause"] == "restart"]
    return gap


def test_a_clean_restart_is_a_gap_covering_the_frames_sent_meanwhile(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """Stop, 5 frames sent while stopped (lost upstream), start: a restart gap from the stop to
    the first connection, around the moment those frames were sent."""
    config = make_config({"main": [UP]})
    first = run_forwarder(config)
    wait_for(lambda: first.stats[0].state.value == "connected", what="connected")
    simulator.send("main", UP, 3)
    wait_for(lambda: first.stats[0].forwarded == 3, what="3 forwarded")
    before_stop = time.time()
    first.shutdown()
    after_stop = time.time()
    sent_at = time.time()
    assert simulator.send("main", UP, 5) == 0  # nobody holds the slot: gone
    second = run_forwarder(config)
    wait_for(lambda: second.stats[0].gaps_recorded == 1, what="the restart gap written")
    gap = restart_gap(redis_client)
    assert before_stop * 1000 - 1 <= int(gap["start"]) <= after_stop * 1000 + 1
    assert int(gap["start"]) <= sent_at * 1000 <= int(gap["end"])
    assert (gap["source"], gap["event"], gap["recovered"]) == ("main", UP, "1")
    assert [f[b"data"] for _, f in xrange(redis_client, f"main:{UP}")] == (
        simulator.delivered_frames("main", UP)
    )


@pytest.mark.slow
def test_after_kill_9_the_restart_gap_starts_at_most_a_save_interval_early(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """`forwarder run` killed with SIGKILL: the next start's gap begins no later than the kill
    and no earlier than SAVE_INTERVAL (plus a second of slack) before it."""
    config = make_config({"main": [UP]})
    assert config.path is not None
    proc = subprocess.Popen(
        [sys.executable, "-m", "forwarder", "run", "--config", str(config.path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: simulator.stats()["slots"].get("main", {}).get(UP, {}).get("holder_open"),
            20.0,
            "the subprocess connected",
        )
        marks = config.spool.dir / FILE_NAME
        wait_for(marks.exists, SAVE_INTERVAL + 10.0, "a first save")
        saved = marks.stat().st_mtime
        wait_for(lambda: marks.stat().st_mtime > saved, SAVE_INTERVAL + 10.0, "a second save")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    killed_at = time.time()
    second = run_forwarder(config)
    wait_for(lambda: second.stats[0].gaps_recorded == 1, what="the restart gap written")
    gap = restart_gap(redis_client)
    assert (killed_at - SAVE_INTERVAL - 1.0) * 1000 <= int(gap["start"]) <= killed_at * 1000
    assert int(gap["end"]) >= killed_at * 1000
