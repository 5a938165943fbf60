"""Retention "acked": nothing a group needs is trimmed until the ceiling; its trims counted."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from forwarder.config import ConsumersConfig, RedisConfig, load_config
from forwarder.consumers import StreamMonitor
from forwarder.daemon import Forwarder
from forwarder.errors import ConfigError
from forwarder.retention import Retention, server_version, writer_config
from forwarder.streaminfo import id_key
from forwarder_sim import Simulator
from tests.conftest import ConfigFactory
from tests.helpers import wait_for, xrange

NODE = 10  # stream-node-max-entries in these tests: `~` trims whole nodes


@pytest.fixture
def small_nodes(redis_client: redis.Redis) -> Iterator[redis.Redis]:
    """Stream nodes of 10 entries, so approximate trimming shows with a few hundred entries."""
    before = str(redis_client.config_get("stream-node-max-entries")["stream-node-max-entries"])
    redis_client.config_set("stream-node-max-entries", NODE)
    yield redis_client
    redis_client.config_set("stream-node-max-entries", before)


Reply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]  # XREADGROUP's


def fill(client: redis.Redis, stream: str, count: int) -> list[bytes]:
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(stream, {"data": json.dumps({"n": i})})
    return [bytes(i) for i in pipe.execute()]


def deliver(client: redis.Redis, stream: str, group: str, count: int | None = None) -> list[bytes]:
    """XREADGROUP as consumer c1; the IDs delivered."""
    reply = cast(Reply, client.xreadgroup(group, "c1", {stream: ">"}, count=count))
    return [entry_id for _, entries in reply for entry_id, _ in entries]


def after_id(entry_id: bytes, other: bytes) -> bool:
    """Stream-ID order (not byte order: "5-9" comes before "5-10")."""
    return id_key(entry_id.decode()) > id_key(other.decode())


def ids(client: redis.Redis, stream: str) -> list[bytes]:
    return [entry_id for entry_id, _ in xrange(client, stream)]


def acked_monitor(
    client: redis.Redis, maxlen: int | None, *streams: str, scan: int = 1000
) -> StreamMonitor:
    retention = Retention(maxlen, scan=scan)
    return StreamMonitor(client, lambda: streams, ConsumersConfig(interval=1.0), retention)


# -- the whole daemon ---------------------------------------------------------------------------


def test_a_stopped_group_loses_nothing_until_the_ceiling_and_ceiling_trims_are_counted(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    small_nodes: redis.Redis,
) -> None:
    """Under "acked": acknowledged entries go, a stopped group's unread ones stay until maxlen;
    then every entry the ceiling removed unread is counted, exactly, per group."""
    client = small_nodes
    stream = "messages.upsert"
    for group in ("fast", "stopped"):
        client.xgroup_create(stream, group, id="0", mkstream=True)
    config = make_config(
        {"main": [stream]},
        stream="{event}",
        redis_extra='retention = "acked"\nmaxlen = 300',
        extra="[consumers]\ninterval = 0.2\n",
    )
    forwarder = run_forwarder(config)
    wait_for(lambda: simulator.stats()["connections_open"] == 1, what="connected")
    assert simulator.send("main", stream, 100) == 100
    wait_for(lambda: forwarder.stats[0].forwarded == 100, what="100 forwarded")
    got: dict[str, list[bytes]] = {"fast": [], "stopped": []}
    got["stopped"] = deliver(client, stream, "stopped", 20)
    client.xack(stream, "stopped", *got["stopped"])  # ... and then it stops reading

    def fast_reads() -> None:
        new = deliver(client, stream, "fast")
        if new:
            client.xack(stream, "fast", *new)
            got["fast"] += new

    fast_reads()
    wait_for(
        lambda: forwarder.consumers.snapshot().trimmed.get((stream, "acked"), 0) > 0,
        what="acknowledged entries trimmed",
    )
    # Everything the stopped group has not read is still there, in order.
    last_read = got["stopped"][-1]
    unread = [
        fields[b"data"]
        for entry_id, fields in xrange(client, stream)
        if after_id(entry_id, last_read)
    ]
    assert unread == simulator.delivered_frames("main", stream)[20:]
    present = ids(client, stream)
    assert len(present) < 100  # and acknowledged entries did go

    # 400 more: past the ceiling. The fast group keeps reading meanwhile.
    assert simulator.send("main", stream, 400) == 400
    wait_for(lambda: forwarder.stats[0].forwarded == 500, what="500 forwarded")

    def settled() -> bool:
        fast_reads()
        snap = forwarder.consumers.snapshot()
        return (
            client.xlen(stream) <= 300 + NODE
            and len(got["fast"]) + sum(v for (s, g), v in snap.unread.items() if g == "fast") == 500
        )

    wait_for(settled, 20, "the ceiling enforced and the fast group done")
    snap = forwarder.consumers.snapshot()
    assert snap.trimmed.get((stream, "ceiling"), 0) > 0
    # The stopped group lost exactly the entries it never got that are gone now.
    kept_for_stopped = [i for i in ids(client, stream) if after_id(i, last_read)]
    lost_stopped = 500 - len(got["stopped"]) - len(kept_for_stopped)
    assert lost_stopped > 0
    assert snap.unread[(stream, "stopped")] == lost_stopped
    # The fast group lost only what the ceiling trimmed before it read it (often nothing).
    assert snap.unread.get((stream, "fast"), 0) == 500 - len(got["fast"])


def test_streams_without_groups_follow_maxlen_under_acked(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    small_nodes: redis.Redis,
) -> None:
    """No consumer group: the stream is trimmed to maxlen (~) by the monitor, not by XADD."""
    config = make_config(
        {"main": ["chats.upsert"]},
        stream="{event}",
        redis_extra='retention = "acked"\nmaxlen = 100',
        extra="[consumers]\ninterval = 0.2\n",
    )
    forwarder = run_forwarder(config)
    wait_for(lambda: simulator.stats()["connections_open"] == 1, what="connected")
    assert simulator.send("main", "chats.upsert", 300) == 300
    wait_for(lambda: forwarder.stats[0].forwarded == 300, what="300 forwarded")
    wait_for(lambda: small_nodes.xlen("chats.upsert") <= 100 + NODE, what="trimmed to maxlen")
    assert forwarder.consumers.snapshot().trimmed[("chats.upsert", "maxlen")] >= 300 - 100 - NODE


# -- the TRIM step against known states ---------------------------------------------------------


def test_pending_entries_hold_the_floor_until_acknowledged(small_nodes: redis.Redis) -> None:
    """Delivered but unacknowledged entries are never trimmed; once acknowledged they go."""
    client = small_nodes
    entries = fill(client, "s", 100)
    client.xgroup_create("s", "worker", id="0")
    client.xgroup_create("s", "archive", id="0")
    client.xack("s", "archive", *deliver(client, "s", "archive"))
    delivered = deliver(client, "s", "worker", 60)
    client.xack("s", "worker", *delivered[:25])  # 26..60 stay pending
    monitor = acked_monitor(client, None, "s")
    assert monitor.run_round()
    present = ids(client, "s")
    assert set(entries[25:]) <= set(present)  # the oldest pending (26th) and all after it
    assert len(present) <= 100 - 20  # two whole acknowledged nodes went
    client.xack("s", "worker", *delivered[25:])
    assert monitor.run_round()
    assert set(entries[60:]) <= set(ids(client, "s"))  # 61.. not delivered to worker yet
    assert len(ids(client, "s")) <= 40 + NODE


def test_ceiling_counts_a_reader_inside_the_cut_exactly(small_nodes: redis.Redis) -> None:
    """A group that read part of what the ceiling removes: only its unread removed entries count."""
    client = small_nodes
    entries = fill(client, "s", 400)
    client.xgroup_create("s", "partial", id="0")
    client.xgroup_create("s", "skipped", id="0")
    last = {"partial": deliver(client, "s", "partial", 50)[-1]}  # Redis knows its lag: 350
    # "skipped" read 5, then the head was trimmed past it and it read on: Redis' lag is 5 high
    # (still below the length, so it looks possible).
    deliver(client, "s", "skipped", 5)
    client.xtrim("s", minid=entries[10].decode(), approximate=False)
    last["skipped"] = deliver(client, "s", "skipped", 30)[-1]  # entries 11..40
    # Another stream: "deleted" read 80; an XDEL ahead of it makes Redis' lag nil, and with
    # a scan of 50 the monitor can only estimate it.
    other = fill(client, "d", 400)
    client.xgroup_create("d", "deleted", id="0")
    last["deleted"] = deliver(client, "d", "deleted", 80)[-1]
    client.xdel("d", other[300])
    lags = {g["name"]: g["lag"] for k in ("s", "d") for g in client.xinfo_groups(k)}
    assert lags[b"skipped"] == 400 - 35  # the states under test
    assert lags[b"deleted"] is None
    monitor = acked_monitor(client, 300, "s", "d", scan=50)
    before = {k: ids(client, k) for k in ("s", "d")}
    assert monitor.run_round()
    unread = monitor.snapshot().unread
    for group, last_read in last.items():
        key = "d" if group == "deleted" else "s"
        after = set(ids(client, key))
        assert len(after) >= 300
        removed = [i for i in before[key] if i not in after]
        assert removed, key
        assert unread.get((key, group), 0) == sum(1 for i in removed if after_id(i, last_read)), (
            group
        )
    assert unread[("s", "partial")] > 0


def test_acked_trim_never_removes_what_a_group_was_not_delivered(small_nodes: redis.Redis) -> None:
    """A group that never read: the acked trim keeps everything (no ceiling configured)."""
    client = small_nodes
    entries = fill(client, "s", 100)
    client.xgroup_create("s", "idle", id="0")
    client.xgroup_create("s", "busy", id="0")
    client.xack("s", "busy", *deliver(client, "s", "busy"))
    monitor = acked_monitor(client, None, "s")
    assert monitor.run_round()
    assert ids(client, "s") == entries
    assert monitor.snapshot().unread == {}


# -- configuration and server detection ---------------------------------------------------------


class _InfoClient:
    """Stands in for a Redis 8.2 server's INFO reply, which this machine cannot run."""

    def __init__(self, info: dict[str, Any]) -> None:
        self._info = info

    def info(self, section: str) -> dict[str, Any]:
        return self._info


def test_native_acked_trimming_is_detected_from_the_server_version(
    redis_client: redis.Redis,
) -> None:
    """Redis 8.2+ gets XTRIM ... ACKED; the local Redis 7 the portable floor only."""
    local = Retention(100)
    local.detect(redis_client)
    assert local.native is False
    assert local.args()[1] == 0
    new = Retention(100)
    new.detect(_InfoClient({"redis_version": "8.2.1"}))  # type: ignore[arg-type]
    assert new.native is True
    assert new.args() == [100, 1, new.args()[2], new.args()[3]]
    assert server_version({"redis_version": "7.0.15"}) == (7, 0, 15)
    assert server_version({}) == ()


def test_writer_does_not_trim_under_acked() -> None:
    """Under "acked" the writer's XADD gets no MAXLEN; under "maxlen" it keeps it."""
    assert writer_config(RedisConfig(maxlen=10, retention="acked")).maxlen is None
    assert writer_config(RedisConfig(maxlen=10, retention="maxlen")).maxlen == 10


def _load(tmp_path: Path, body: str) -> None:
    path = tmp_path / "f.toml"
    token = tmp_path / "token"
    token.write_text("a.b.c")
    path.write_text(
        body + f'\n[[sources]]\nname = "m"\nurl = "ws://127.0.0.1:1/ws/events"\n'
        f'token_file = "{token}"\n'
    )
    load_config(path, {})


def test_retention_and_monitor_settings_are_validated(tmp_path: Path) -> None:
    """A wrong mode, or "acked" with the monitor off, is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=r"redis\.retention.*'everything'"):
        _load(tmp_path, '[redis]\nretention = "everything"')
    with pytest.raises(ConfigError, match=r"consumers\.interval = 0"):
        _load(tmp_path, '[redis]\nretention = "acked"\n[consumers]\ninterval = 0')
    _load(tmp_path, '[redis]\nretention = "acked"\nmaxlen = 5\n[consumers]\ninterval = 2.5')
