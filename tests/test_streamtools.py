"""`forwarder tail`, `streams` and `dlq show` as a user runs them, on forwarder's real output."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import redis

from forwarder.config import Config
from forwarder.daemon import Forwarder
from forwarder.errors import ExitCode
from forwarder_sim import Simulator
from tests.conftest import ConfigFactory
from tests.helpers import free_port, wait_for, xrange

EVENTS = ["messages.upsert", "call.upsert"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    """Run `forwarder ARGS`; (exit code, stdout, stderr)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def running(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
) -> tuple[Config, Forwarder]:
    """A forwarder writing main:messages.upsert and main:call.upsert from the simulator."""
    config = make_config({"main": EVENTS})
    forwarder = run_forwarder(config)
    wait_for(lambda: simulator.stats()["connections_open"] == 2, what="connected")
    return config, forwarder


def forwarded(forwarder: Forwarder, count: int) -> None:
    wait_for(lambda: sum(s.forwarded for s in forwarder.stats) >= count, what=f"{count} forwarded")


def test_tail_prints_time_source_event_and_a_summary_per_entry(
    running: tuple[Config, Forwarder], simulator: Simulator
) -> None:
    """--last N: one line per entry with its time, ID, source/event, type, JID and keyId."""
    config, forwarder = running
    assert simulator.send("main", "messages.upsert", 3) == 3
    forwarded(forwarder, 3)
    code, out, err = cli(
        "tail", "main:messages.upsert", "--last", "3", "--count", "3", "--config", str(config.path)
    )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    for line, frame in zip(
        lines, simulator.delivered_frames("main", "messages.upsert"), strict=True
    ):
        message = orjson.loads(frame)
        when, entry_id, who, summary = line.split("  ", 3)
        assert when.endswith("Z")
        assert when[:4].isdigit()
        assert "-" in entry_id
        assert who == "main/messages.upsert"
        assert summary.startswith(f"{message['messageType']} ")
        assert message["keyRemoteJid"] in summary
        assert f"keyId={message['keyId']}" in summary


def test_tail_follows_new_entries_and_json_is_the_raw_entry(
    running: tuple[Config, Forwarder], simulator: Simulator, redis_client: redis.Redis
) -> None:
    """Started before the entries: it prints them as they come; --json keeps `data` verbatim."""
    config, _ = running
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forwarder",
            "tail",
            "main:call.upsert",
            "--json",
            "--count",
            "2",
            "--config",
            str(config.path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: any(c.get("cmd") == "xread" for c in redis_client.client_list()),
            15,
            "tail blocking in XREAD",
        )
        assert simulator.send("main", "call.upsert", 2) == 2
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["fields"]["data"].encode() for d in docs] == simulator.delivered_frames(
        "main", "call.upsert"
    )
    assert {d["fields"]["event"] for d in docs} == {"call.upsert"}
    assert [d["id"].encode() for d in docs] == [
        i for i, _ in xrange(redis_client, "main:call.upsert")
    ]


def test_tail_group_shows_what_the_group_has_not_read_without_consuming(
    running: tuple[Config, Forwarder], simulator: Simulator, redis_client: redis.Redis
) -> None:
    """--group G starts at G's last-delivered entry and leaves the group's state alone."""
    config, forwarder = running
    redis_client.xgroup_create("main:messages.upsert", "billing", id="0", mkstream=True)
    assert simulator.send("main", "messages.upsert", 3) == 3
    forwarded(forwarder, 3)
    redis_client.xreadgroup("billing", "w1", {"main:messages.upsert": ">"}, count=1)
    before = redis_client.xinfo_groups("main:messages.upsert")
    code, out, err = cli(
        "tail",
        "main:messages.upsert",
        "--group",
        "billing",
        "--count",
        "2",
        "--json",
        "--config",
        str(config.path),
    )
    assert code == 0, err
    frames = simulator.delivered_frames("main", "messages.upsert")
    assert [json.loads(line)["fields"]["data"].encode() for line in out.splitlines()] == frames[1:]
    assert redis_client.xinfo_groups("main:messages.upsert") == before
    code, _, err = cli(
        "tail", "main:messages.upsert", "--group", "nope", "--config", str(config.path)
    )
    assert code == ExitCode.CONFIG
    assert "no consumer group 'nope'" in err
    assert "billing" in err


def test_streams_table_shows_length_groups_lag_pending_and_dead_letters(
    running: tuple[Config, Forwarder], simulator: Simulator, redis_client: redis.Redis
) -> None:
    """One row per stream and group, with the numbers Redis holds; --json the same as data."""
    config, forwarder = running
    redis_client.xgroup_create("main:messages.upsert", "billing", id="0", mkstream=True)
    assert simulator.send("main", "messages.upsert", 5) == 5
    assert simulator.invalid_json("main", "call.upsert", count=2) == 2
    wait_for(lambda: redis_client.xlen("main:call.upsert:dlq") == 2, what="2 dead letters")
    forwarded(forwarder, 5)
    redis_client.xreadgroup("billing", "w1", {"main:messages.upsert": ">"}, count=2)
    code, out, err = cli("streams", "--config", str(config.path))
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:5] == ["STREAM", "LENGTH", "GROUP", "CONSUMERS", "LAG"]
    by_stream = {row[0]: row for row in rows[1:]}
    # stream, length, group, consumers, lag, pending, oldest pending age, dead letters
    assert by_stream["main:messages.upsert"][:6] == [
        "main:messages.upsert",
        "5",
        "billing",
        "1",
        "3",
        "2",
    ]
    assert by_stream["main:messages.upsert"][7] == "0"
    assert by_stream["main:call.upsert"] == [
        "main:call.upsert",
        "(none)",
        "-",
        "-",
        "-",
        "-",
        "-",
        "2",
    ]
    code, out, _ = cli("streams", "main:messages.upsert", "--json", "--config", str(config.path))
    doc = json.loads(out)
    assert doc["length"] == 5
    assert doc["groups"][0]["lag"] == 3
    assert doc["groups"][0]["pending"] == 2


def test_dlq_show_decodes_reason_size_and_the_head_of_the_bytes(
    running: tuple[Config, Forwarder], simulator: Simulator, redis_client: redis.Redis
) -> None:
    """Each dead letter: its reason, its size and the first bytes as received."""
    config, _ = running
    assert simulator.invalid_json("main", "call.upsert") == 1
    assert simulator.binary("main", "call.upsert") == 1
    wait_for(lambda: redis_client.xlen("main:call.upsert:dlq") == 2, what="2 dead letters")
    stored = [
        base64.b64decode(fields[b"data_base64"])
        for _, fields in xrange(redis_client, "main:call.upsert:dlq")
    ]
    code, out, err = cli("dlq", "show", "main:call.upsert", "--config", str(config.path))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert "main/call.upsert  invalid_json  " in lines[0]
    assert "main/call.upsert  binary  " in lines[1]
    for line, data in zip(lines, stored, strict=True):
        assert f"  {len(data)} bytes  " in line
        assert repr(data[:20])[2:-1] in line
    code, out, _ = cli(
        "dlq", "show", "main:call.upsert:dlq", "--json", "--config", str(config.path)
    )
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["reason"] for d in docs] == ["invalid_json", "binary"]
    assert bytes.fromhex(docs[0]["head_hex"]) == stored[0][:48]


def test_no_password_is_printed_or_taken_from_the_command_line(tmp_path: Path) -> None:
    """A password in FORWARDER_REDIS_URL never shows in errors; one in --redis-url is refused."""
    port = free_port()  # nothing listens there
    code, out, err = cli(
        "streams", "s", env={"FORWARDER_REDIS_URL": f"redis://app:hunter2@127.0.0.1:{port}/0"}
    )
    assert code == ExitCode.STARTUP
    assert "hunter2" not in out + err
    assert f"redis://app:***@127.0.0.1:{port}/0" in err
    code, out, err = cli("tail", "s", "--redis-url", f"redis://app:hunter2@127.0.0.1:{port}/0")
    assert code == ExitCode.CONFIG
    assert "hunter2" not in out + err
    assert "no password on the command line" in err


def test_a_key_that_is_not_a_stream_is_a_clear_error(redis_client: redis.Redis) -> None:
    """`streams` on a string key: exit 2 naming the key and its type, no traceback."""
    redis_client.set("plain", "x")
    port = redis_client.connection_pool.connection_kwargs["port"]
    code, _, err = cli("streams", "plain", "--redis-url", f"redis://127.0.0.1:{port}/0")
    assert code == ExitCode.CONFIG
    assert "'plain' is a Redis string, not a stream" in err
    assert "Traceback" not in err
