"""Discovery and fan-in end to end: the daemon, the simulator's listing and a real Redis.

Polls are driven by the test (`forwarder.discovery.poll`), with poll_interval long enough
that the poller thread only makes its first poll: "picked up within one poll" is then an
exact statement, not a race against a timer.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import jwt
import pytest
import redis

from forwarder.cli import main as cli_main
from forwarder.config import Config, load_config
from forwarder.daemon import Forwarder
from forwarder.script import mark_key
from forwarder_sim import Simulator, mint_token
from tests.conftest import SECRET
from tests.helpers import RedisServer, free_port, wait_for, xrange
from tests.proxy import ReplyCuttingProxy

API_KEY = "fanin-global-key-5f0c"
EVENTS = ("messages.upsert", "messages.update", "connection.update")
TABLE = "codechat"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A recording simulator whose listing wants API_KEY."""
    with Simulator(SECRET, record=True, api_key=API_KEY) as s:
        yield s


def write_config(
    tmp_path: Path,
    sim: Simulator,
    redis_url: str,
    events: tuple[str, ...] = EVENTS,
    extra: str = "",
    static: str = "",
    redis_extra: str = "",
) -> Path:
    event_list = ", ".join(f'"{e}"' for e in events)
    text = textwrap.dedent(
        f"""
        shutdown_timeout = 10.0
        [spool]
        dir = "{tmp_path / "spool"}"
        [redis]
        url = "{redis_url}"
        {redis_extra}
        [metrics]
        listen = "127.0.0.1:0"

        [[discovery]]
        name = "{TABLE}"
        api_url = "http://127.0.0.1:{sim.port}"
        api_key_env = "FANIN_KEY"
        events = [{event_list}]
        poll_interval = 3600
        request_timeout = 1.0
        """
    )
    path = tmp_path / "forwarder.toml"
    path.write_text(text + textwrap.dedent(extra) + textwrap.dedent(static))
    return path


def load(path: Path, key: str = API_KEY) -> Config:
    return load_config(path, {"FANIN_KEY": key})


def started(forwarder: Forwarder) -> Forwarder:
    """Wait for the poller thread's first poll (and its reconciliation); later polls are the
    test's."""
    wait_for(lambda: forwarder.discovery.completed >= 1, 10, "the first poll")
    return forwarder


def subscribed(forwarder: Forwarder) -> set[str]:
    return {s.subscription.source.name for s in forwarder.subscribers}


def holders_open(sim: Simulator, names: list[str], events: tuple[str, ...] = EVENTS) -> bool:
    slots = sim.stats()["slots"]
    return all(slots.get(n, {}).get(e, {}).get("holder_open") for n in names for e in events)


def by_source(client: redis.Redis, stream: str) -> dict[str, list[bytes]]:
    """A shared stream's entries split by their `source` field, in stream order."""
    out: dict[str, list[bytes]] = {}
    for _, fields in xrange(client, stream):
        out.setdefault(fields[b"source"].decode(), []).append(fields[b"data"])
    return out


def http_get(forwarder: Forwarder, path: str) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{forwarder.http.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, bytes(response.read())
    except urllib.error.HTTPError as err:
        return err.code, bytes(err.read())


def test_twenty_instances_are_discovered_and_forwarded_exactly_once_into_shared_streams(
    tmp_path: Path,
    sim: Simulator,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    run_forwarder: Callable[..., Forwarder],
) -> None:
    """20 listed instances, 3 events each: one stream per event, every frame once, in order
    per instance, tagged with the instance's name."""
    names = [f"tenant-{i:02d}" for i in range(20)]
    for name in names:
        sim.create_instance(name)
    forwarder = started(run_forwarder(load(write_config(tmp_path, sim, redis_server.url))))
    assert subscribed(forwarder) == set(names)
    wait_for(lambda: holders_open(sim, names), 30, "60 subscriptions connected")
    for name in names:
        for event in EVENTS:
            assert sim.send(name, event, 25) == 25
    total = 20 * 3 * 25
    wait_for(lambda: sum(s.forwarded for s in forwarder.stats) == total, 30, "all forwarded")
    for event in EVENTS:
        shared = by_source(redis_client, event)
        assert set(shared) == set(names)
        for name in names:
            assert shared[name] == sim.delivered_frames(name, event), (name, event)
    keys = cast(list[bytes], redis_client.keys("*"))
    # One stream per event for every instance, and each stream's own high-water mark.
    marks = [mark_key(event, forwarder.spool.writer_id) for event in EVENTS]
    assert sorted(k.decode() for k in keys) == sorted([*EVENTS, *marks])
    (status,) = json.loads(http_get(forwarder, "/status")[1])["discovery"]
    assert (status["name"], status["instances"], status["errors"]) == (TABLE, 20, {})
    metrics = http_get(forwarder, "/metrics")[1].decode()
    assert f'forwarder_discovered_sources{{discovery="{TABLE}"}} 20.0' in metrics


def test_an_instance_added_and_one_deleted_at_run_time_are_picked_up_within_one_poll(
    tmp_path: Path,
    sim: Simulator,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    run_forwarder: Callable[..., Forwarder],
) -> None:
    """Created: subscribed by the next poll. Deleted: kept after one absent listing, stopped
    after the second, its last gap record `removed`; the others never restart."""
    for name in ("a", "b", "c"):
        sim.create_instance(name)
    forwarder = started(run_forwarder(load(write_config(tmp_path, sim, redis_server.url))))
    wait_for(lambda: holders_open(sim, ["a", "b", "c"]), 20, "connected")
    kept = {id(s) for s in forwarder.subscribers if s.subscription.source.name != "c"}
    sim.create_instance("new")
    sim.delete_instance("c")
    forwarder.discovery.poll(TABLE)
    assert subscribed(forwarder) == {"a", "b", "c", "new"}
    assert forwarder.discovery.status()[0]["pending_removal"] == {"c": 1}
    forwarder.discovery.poll(TABLE)
    assert subscribed(forwarder) == {"a", "b", "new"}
    assert kept <= {id(s) for s in forwarder.subscribers}
    wait_for(lambda: holders_open(sim, ["new"]), 20, "the new instance connected")
    assert sim.send("new", "messages.upsert", 10) == 10
    wait_for(lambda: len(by_source(redis_client, "messages.upsert").get("new", [])) == 10)
    wait_for(lambda: sum(s.gaps_recorded for s in forwarder.stats) >= 3, 10, "gap records")
    removed = [
        f
        for _, f in xrange(redis_client, "forwarder:gaps")
        if f[b"cause"] == b"removed" and f[b"source"] == b"c"
    ]
    assert sorted(f[b"event"].decode() for f in removed) == sorted(EVENTS)
    assert all(f[b"recovered"] == b"0" for f in removed)
    assert b"no longer listed by discovery" in removed[0][b"detail"]


def test_a_rotated_token_is_used_at_the_next_connect_and_not_before(
    tmp_path: Path,
    sim: Simulator,
    redis_server: RedisServer,
    run_forwarder: Callable[..., Forwarder],
) -> None:
    """A new Auth.token: the healthy connection stays; the reconnect after a drop uses it."""
    sim.create_instance("a")
    old = jwt.decode(sim.instance_token("a"), options={"verify_signature": False})
    forwarder = started(
        run_forwarder(load(write_config(tmp_path, sim, redis_server.url, ("messages.upsert",))))
    )
    first = sim.wait_for_holder("a", "messages.upsert", 1, 10)
    new = jwt.decode(sim.rotate_token("a"), options={"verify_signature": False})
    forwarder.discovery.poll(TABLE)
    assert sim.stats()["slots"]["a"]["messages.upsert"]["connections"] == 1
    assert sim.stats()["connections"][str(first)]["token_id"] == old["tokenId"]
    sim.drop("a", "messages.upsert")
    second = sim.wait_for_holder("a", "messages.upsert", 2, 20)
    assert sim.stats()["connections"][str(second)]["token_id"] == new["tokenId"]


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ({"mode": "reset"}, "connection"),
        ({"mode": "hang", "seconds": 5}, "timeout"),
        ({"mode": "status", "status": 503}, "http_5xx"),
        ({"mode": "status", "status": 401}, "unauthorized"),
        ({"mode": "garbage"}, "invalid_json"),
        ({"mode": "object"}, "invalid_json"),
    ],
)
def test_the_api_failing_for_several_polls_changes_nothing_that_runs(
    tmp_path: Path,
    sim: Simulator,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    run_forwarder: Callable[..., Forwarder],
    fault: dict[str, object],
    kind: str,
) -> None:
    """Down, hanging, 5xx, 401 or garbage for 3 polls: same subscribers, no reconnect, frames
    still forwarded once, the kind counted; the next good poll clears the error."""
    for name in ("a", "b"):
        sim.create_instance(name)
    forwarder = started(
        run_forwarder(load(write_config(tmp_path, sim, redis_server.url, ("messages.upsert",))))
    )
    wait_for(lambda: holders_open(sim, ["a", "b"], ("messages.upsert",)), 20, "connected")
    before = forwarder.subscribers
    sim.api_fault(count=-1, **fault)  # type: ignore[arg-type]
    for _ in range(3):
        forwarder.discovery.poll(TABLE)
    assert forwarder.subscribers == before
    assert not any(s.finished for s in before)
    for name in ("a", "b"):
        assert sim.stats()["slots"][name]["messages.upsert"]["connections"] == 1
        assert sim.send(name, "messages.upsert", 20) == 20
    wait_for(lambda: sum(s.forwarded for s in forwarder.stats) == 40, 20, "forwarded")
    shared = by_source(redis_client, "messages.upsert")
    for name in ("a", "b"):
        assert shared[name] == sim.delivered_frames(name, "messages.upsert")
    (status,) = forwarder.discovery.status()
    assert status["errors"][kind] == 3
    assert status["last_error_kind"] == kind
    assert status["instances"] == 2
    sim.api_heal()
    forwarder.discovery.poll(TABLE)
    assert forwarder.discovery.status()[0]["last_error_kind"] is None


def test_readyz_waits_for_the_first_listing_then_stays_ready_through_failures(
    tmp_path: Path,
    sim: Simulator,
    redis_server: RedisServer,
    run_forwarder: Callable[..., Forwarder],
) -> None:
    """No believed listing yet: 503 naming the table. Once listed and connected: 200, and
    still 200 while later listings fail."""
    sim.create_instance("a")
    sim.api_fault("status", count=-1, status=502)
    forwarder = started(
        run_forwarder(load(write_config(tmp_path, sim, redis_server.url, ("messages.upsert",))))
    )
    code, body = http_get(forwarder, "/readyz")
    assert code == 503
    assert json.loads(body)["discovery_waiting_for_first_listing"] == [TABLE]
    sim.api_heal()
    forwarder.discovery.poll(TABLE)
    wait_for(lambda: http_get(forwarder, "/readyz")[0] == 200, 20, "ready")
    sim.api_fault("status", count=-1, status=502)
    forwarder.discovery.poll(TABLE)
    assert http_get(forwarder, "/readyz")[0] == 200


def test_a_static_source_and_discovery_mix_and_a_clash_is_refused(
    tmp_path: Path,
    sim: Simulator,
    redis_server: RedisServer,
    run_forwarder: Callable[..., Forwarder],
) -> None:
    """A static source named like a listed instance keeps the name; the clash is reported."""
    sim.create_instance("shared")
    sim.create_instance("other")
    token = tmp_path / "token"
    token.write_text(mint_token("shared", SECRET))
    static = f"""
        [[sources]]
        name = "shared"
        url = "{sim.url}"
        token_file = "{token}"
        events = ["call.upsert"]
        """
    path = write_config(tmp_path, sim, redis_server.url, ("messages.upsert",), static=static)
    forwarder = started(run_forwarder(load(path)))
    keys = {s.subscription.key for s in forwarder.subscribers}
    assert keys == {("shared", "call.upsert"), ("other", "messages.upsert")}
    (status,) = forwarder.discovery.status()
    assert "name clash" in status["refused"]["shared"]
    assert status["errors"]["refused"] == 1


def test_a_reload_keeps_discovered_connections_and_applies_a_new_exclude(
    tmp_path: Path,
    sim: Simulator,
    redis_server: RedisServer,
    run_forwarder: Callable[..., Forwarder],
) -> None:
    """SIGHUP with an exclude: that instance stops at once, the others keep their sockets."""
    for name in ("a", "b"):
        sim.create_instance(name)
    path = write_config(tmp_path, sim, redis_server.url, ("messages.upsert",))
    forwarder = started(run_forwarder(load(path), reload=lambda: load(path)))
    wait_for(lambda: holders_open(sim, ["a", "b"], ("messages.upsert",)), 20, "connected")
    a = next(s for s in forwarder.subscribers if s.subscription.source.name == "a")
    path.write_text(path.read_text().replace("request_timeout", 'exclude = ["b"]\nrequest_timeout'))
    assert forwarder.reload()
    assert [s.subscription.source.name for s in forwarder.subscribers] == ["a"]
    assert forwarder.subscribers[0] is a
    assert sim.stats()["slots"]["a"]["messages.upsert"]["connections"] == 1


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.mark.fault
def test_fan_in_replays_after_lost_replies_stay_exactly_once_per_source(
    tmp_path: Path,
    sim: Simulator,
    own_redis: RedisServer,
    run_forwarder: Callable[..., Forwarder],
) -> None:
    """Two sources, one stream, three batches applied but unconfirmed: no entry twice, each
    source's order intact; dead letters and gaps of the shared stream carry `source`."""
    proxy = ReplyCuttingProxy(own_redis.port)
    proxy.start()
    try:
        for name in ("a", "b"):
            sim.create_instance(name)
        path = write_config(
            tmp_path,
            sim,
            f"redis://127.0.0.1:{proxy.port}/0",
            ("messages.upsert",),
            redis_extra="socket_timeout = 1.0",
        )
        forwarder = started(run_forwarder(load(path)))
        wait_for(lambda: holders_open(sim, ["a", "b"], ("messages.upsert",)), 20, "connected")
        # A first write loads the script: a cut NOSCRIPT reply would be a batch never applied.
        sim.send("a", "messages.upsert", 10)
        sim.send("b", "messages.upsert", 10)
        wait_for(lambda: sum(s.forwarded for s in forwarder.stats) == 20, 20, "script loaded")
        for _ in range(3):
            proxy.cut_next_reply()
            sim.send("a", "messages.upsert", 150)
            sim.send("b", "messages.upsert", 150)
            wait_for(lambda: not proxy._armed.is_set(), 10, "a reply cut")
        sim.invalid_json("a", "messages.upsert")
        sim.invalid_json("b", "messages.upsert")
        sim.drop("a", "messages.upsert")
        sim.wait_for_holder("a", "messages.upsert", 2, 20)
        wait_for(lambda: sum(s.forwarded for s in forwarder.stats) == 920, 30, "all written")
        wait_for(lambda: sum(s.gaps_recorded for s in forwarder.stats) >= 1, 20, "a gap")
        wait_for(lambda: sum(sum(s.invalid.values()) for s in forwarder.stats) == 2, 20, "two DLQ")
        assert proxy.cuts == 3
        client = own_redis.client()
        try:
            shared = by_source(client, "messages.upsert")
            for name in ("a", "b"):
                got = shared[name]
                assert len(got) == len(set(got)), f"duplicates of {name}"
                assert got == sim.delivered_frames(name, "messages.upsert")
            dlq = [f[b"source"] for _, f in xrange(client, "messages.upsert:dlq")]
            assert sorted(dlq) == [b"a", b"b"]
            gaps = [f for _, f in xrange(client, "forwarder:gaps") if f[b"source"] == b"a"]
            assert gaps[0][b"cause"] == b"close:1006"
        finally:
            client.close()
    finally:
        proxy.stop()


CANARY = "CANARY-discovery-key-7d3e91"


def test_the_key_never_appears_in_logs_metrics_status_or_errors(
    tmp_path: Path,
    redis_server: RedisServer,
    run_forwarder: Callable[..., Forwarder],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a right and a wrong canary key: not in DEBUG logs, /metrics, /status, /readyz,
    check-config, `forwarder discover`, or the recorded errors."""
    with Simulator(SECRET, api_key=CANARY, instances=["a"]) as sim:
        wrong = CANARY + "-wrong"
        path = write_config(tmp_path, sim, redis_server.url, ("messages.upsert",))
        second = f"""
            [[discovery]]
            name = "wrong"
            api_url = "http://127.0.0.1:{sim.port}"
            api_key_env = "WRONG_KEY"
            poll_interval = 3600
            """
        path.write_text(path.read_text() + textwrap.dedent(second))
        environ = {"FANIN_KEY": CANARY, "WRONG_KEY": wrong}
        with caplog.at_level(logging.DEBUG):
            forwarder = run_forwarder(load_config(path, environ))
            wait_for(lambda: forwarder.discovery.completed >= 2, 10, "both tables polled")
            wait_for(lambda: holders_open(sim, ["a"], ("messages.upsert",)), 20, "connected")
            sim.api_fault("garbage")
            forwarder.discovery.poll(TABLE)
            forwarder.discovery.poll("wrong")
            texts = [http_get(forwarder, p)[1].decode() for p in ("/metrics", "/status", "/readyz")]
            statuses = {s["name"]: s for s in forwarder.discovery.status()}
            assert statuses["wrong"]["last_error_kind"] == "unauthorized"
            os.environ.update(environ)
            try:
                assert cli_main(["check-config", "--config", str(path)]) == 0
                cli_main(["discover", "--config", str(path)])
            finally:
                for name in environ:
                    os.environ.pop(name, None)
        out = capsys.readouterr()
        everything = "\n".join(
            [caplog.text, *texts, json.dumps(statuses), out.out, out.err, repr(forwarder.config)]
        )
        assert "unauthorized" in caplog.text
        assert statuses[TABLE]["instances"] == 1
        assert CANARY not in everything


def test_forwarder_run_imports_neither_jwt_nor_the_simulator(
    tmp_path: Path, sim: Simulator, redis_server: RedisServer
) -> None:
    """`forwarder run` with discovery, in its own process: once it listed and subscribed,
    neither PyJWT nor forwarder_sim is in sys.modules."""
    sim.create_instance("a")
    path = write_config(tmp_path, sim, redis_server.url, ("messages.upsert",))
    port = free_port()
    path.write_text(
        path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
    )
    report = tmp_path / "modules.json"
    script = textwrap.dedent(
        f"""
        import json, os, signal, sys, threading, urllib.request
        from forwarder.cli import main

        def watch():
            stop = threading.Event()
            for _ in range(600):
                try:
                    with urllib.request.urlopen("http://127.0.0.1:{port}/readyz", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                stop.wait(0.05)
            with open({str(report)!r}, "w") as fh:
                json.dump(sorted(sys.modules), fh)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True).start()
        sys.exit(main(["run", "--config", {str(path)!r}]))
        """
    )
    env = {**os.environ, "FANIN_KEY": API_KEY}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    modules = set(json.loads(report.read_text()))
    assert "forwarder.discovery" in modules  # it really ran discovery
    assert sim.stats()["slots"]["a"]["messages.upsert"]["connections"] >= 1
    assert not {m for m in modules if m == "jwt" or m.startswith(("jwt.", "forwarder_sim"))}
