"""The example consumers (examples/) run against what a real forwarder wrote from the simulator:
every message handled once, upstream duplicates skipped, a crashed consumer's entries taken
over, nothing left pending, and a clean exit on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis

from forwarder.daemon import Forwarder
from forwarder_sim import Simulator
from tests.conftest import ConfigFactory
from tests.helpers import RedisServer, wait_for

ROOT = Path(__file__).resolve().parent.parent
STREAM = "messages.upsert"
GROUP = "billing"
MESSAGES = 20
DUPLICATES = 3  # the upstream emits these messages a second time (same keyId)
CRASHED = 5  # entries a consumer took and never acknowledged


class Consumer:
    """An example consumer as a subprocess; its stdout lines are collected as they come."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.lines: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def stop(self) -> tuple[int, str]:
        """SIGTERM; (exit code, stderr)."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=20)
        self._reader.join(5)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def written(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> list[str]:
    """messages.upsert as forwarder wrote it: 20 messages, 3 of them twice, and 5 entries a
    consumer of the group took and then crashed with. Returns the keyIds, in order."""
    redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    forwarder = run_forwarder(make_config({"main": [STREAM]}, stream="{event}"))
    wait_for(lambda: simulator.stats()["connections_open"] == 1, what="connected")
    assert simulator.send("main", STREAM, MESSAGES) == MESSAGES
    frames = simulator.delivered_frames("main", STREAM)
    for frame in frames[:DUPLICATES]:
        assert simulator.send_raw("main", STREAM, frame)
    total = MESSAGES + DUPLICATES
    wait_for(lambda: forwarder.stats[0].forwarded == total, what="all forwarded")
    assert redis_client.xlen(STREAM) == total
    taken = redis_client.xreadgroup(GROUP, "crashed", {STREAM: ">"}, count=CRASHED)
    assert len(cast(list[Any], taken)[0][1]) == CRASHED
    return [orjson.loads(f)["keyId"] for f in frames]


def pending(client: redis.Redis) -> int:
    return int(client.xpending(STREAM, GROUP)["pending"])


def check_run(consumer: Consumer, key_ids: list[str], client: redis.Redis) -> str:
    """Wait until every message was handled and nothing is pending; stop; check; stderr."""
    try:

        def done() -> bool:
            handled = [line for line in consumer.lines if "keyId" in line]
            return len(handled) >= len(key_ids) and pending(client) == 0

        wait_for(done, 30, "every message handled and acknowledged")
        code, err = consumer.stop()
    finally:
        consumer.kill()
    assert code == 0, err
    handled = [line["keyId"] for line in consumer.lines if "keyId" in line]
    assert sorted(handled) == sorted(key_ids)  # each message exactly once, duplicates not
    assert all(line["source"] == "main" for line in consumer.lines if "keyId" in line)
    consumers = {c["name"]: c for c in client.xinfo_consumers(STREAM, GROUP)}
    assert consumers[b"crashed"]["pending"] == 0  # its entries were taken over
    assert pending(client) == 0
    return err


def test_redis_py_example_handles_each_message_once_and_takes_over_a_crashed_consumer(
    written: list[str], redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """examples/redis_consumer.py: XREADGROUP + XACK + XAUTOCLAIM + keyId dedupe, SIGTERM 0."""
    consumer = Consumer(
        [
            sys.executable,
            "examples/redis_consumer.py",
            "--group",
            GROUP,
            "--claim-idle",
            "0.2",
            "--claim-every",
            "0.3",
            "--block",
            "0.2",
        ],
        {"REDIS_URL": redis_server.url},
    )
    err = check_run(consumer, written, redis_client)
    assert err.count("repeats keyId") == DUPLICATES


def test_faststream_example_handles_each_message_once_and_takes_over_a_crashed_consumer(
    written: list[str], redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """examples/faststream_consumer.py: the same guarantees with FastStream's StreamSub."""
    consumer = Consumer(
        [sys.executable, "examples/faststream_consumer.py"],
        {"REDIS_URL": redis_server.url, "GROUP": GROUP, "CLAIM_IDLE_MS": "200"},
    )
    check_run(consumer, written, redis_client)
    assert sum(1 for line in consumer.lines if "duplicate" in line) == DUPLICATES
