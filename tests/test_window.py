"""Two script calls in flight (forwarder/window.py): what may go second, and what happens
when the first does not come back clean."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from forwarder import sink
from forwarder.config import RedisConfig
from forwarder.frames import Opcode
from forwarder.redis_target import make_target
from forwarder.script import WRITE_BATCH
from forwarder.spool import GAP, Batch, Entry, Route
from forwarder.window import disjoint_run
from tests.conftest import ConfigFactory
from tests.helpers import RedisServer, wait_for, xrange
from tests.test_sink import Harness

ROUTES = [Route("s", f"e{i}", f"s:e{i}", f"s:e{i}:dlq") for i in range(4)]
SHARED = Route("t", "e0", "s:e0", "t:dlq")  # another source writing into stream s:e0


def _batch(routes: list[int], first: int = 1, opcode: int = Opcode.TEXT) -> Batch:
    return [(first + n, Entry(r, opcode, b"[%d]" % (first + n), 1.0)) for n, r in enumerate(routes)]


def test_the_second_call_stops_at_the_first_stream_the_first_call_writes() -> None:
    """Only frames of streams the call in flight does not write may follow it."""
    inflight = _batch([0, 1, 0])
    rest = _batch([2, 3, 2, 1, 3], first=4)
    assert [o for o, _ in disjoint_run(ROUTES, inflight, rest, 100)] == [4, 5, 6]
    # A different route into the same stream counts as the same stream.
    routes = [*ROUTES, SHARED]
    assert disjoint_run(routes, inflight, _batch([2, 4, 3], first=4), 100) == rest[:1]


def test_gap_records_and_binary_frames_never_go_second() -> None:
    """Entries that may go to the gap or dead-letter stream end the run."""
    inflight = _batch([0])
    assert disjoint_run(ROUTES, inflight, _batch([2, 3], first=2, opcode=GAP), 100) == []
    binary = _batch([2], first=2, opcode=Opcode.BINARY)
    assert disjoint_run(ROUTES, inflight, _batch([3], first=2) + binary, 100) == _batch(
        [3], first=2
    )


def test_the_run_is_at_most_limit_long() -> None:
    """A second call is never larger than a batch."""
    assert len(disjoint_run(ROUTES, _batch([0]), _batch([1, 2, 3, 1], first=2), 3)) == 3


@pytest.fixture
def wide(make_config: ConfigFactory, redis_server: RedisServer, tmp_path: Path) -> Harness:
    config = make_config({"main": ["messages.upsert", "chats.upsert", "contacts.upsert"]})
    return Harness(config, make_target(RedisConfig(url=redis_server.url)), tmp_path / "spool")


def test_a_stop_in_the_first_call_loses_nothing_the_second_call_wrote(
    wide: Harness, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first call stops at WRONGTYPE while the second (other streams) is applied: once
    the key is fixed every frame is in its stream once, in order, and counted forwarded."""
    monkeypatch.setattr(sink, "CONFIG_ERROR_RETRY_SECONDS", 0.2)
    redis_client.script_load(WRITE_BATCH)  # else both calls answer NOSCRIPT
    redis_client.set("main:chats.upsert", "not a stream")
    # The first call: messages.upsert and chats.upsert, interleaved (it stops at the first
    # chats.upsert frame); then contacts.upsert (the second call); then messages.upsert
    # again, which must wait for the first call's frames of that stream.
    h = wide
    payloads: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    layout = [0, 1] * 25 + [2] * 40 + [0] * 10
    for n, sub in enumerate(layout):
        payloads[sub].append(b'{"n":%d}' % n)
        h.put(sub, [payloads[sub][-1]])
    try:
        h.writer.start()
        # Two in flight: contacts.upsert lands although the call before it is stuck.
        wait_for(lambda: redis_client.xlen("main:contacts.upsert") == 40, what="second call")
        wait_for(lambda: h.writer_stats.errors["wrongtype"] >= 1, what="WRONGTYPE")
        assert redis_client.xlen("main:messages.upsert") == 1  # only what preceded the stop
        redis_client.delete("main:chats.upsert")  # the operator fixes the key
        wait_for(lambda: h.spool.pending()[0] == 0, what="the spool drained")
        wait_for(lambda: sum(s.forwarded for s in h.stats) == len(layout), what="all counted")
        for sub, stream in enumerate(("messages.upsert", "chats.upsert", "contacts.upsert")):
            entries = xrange(redis_client, f"main:{stream}")
            assert [f[b"data"] for _, f in entries] == payloads[sub], stream
            assert h.stats[sub].forwarded == len(payloads[sub])
        assert h.writer_stats.replayed == 0  # what the second call wrote is ours
    finally:
        h.close()
