"""A complete consumer of forwarder's `messages.upsert` stream, with redis-py.

    REDIS_URL=redis://127.0.0.1:6379/0 python examples/redis_consumer.py --group billing

What it does, and why:
- One consumer group, created at the start of the stream (`0`) if it does not exist, so no
  entry written before the first start is missed (a group created with `$` would miss them).
- XREADGROUP for new entries, and XACK once an entry is handled: an entry is acknowledged
  only after your code is done with it, so a crash means redelivery, not loss.
- XAUTOCLAIM every `--claim-every` seconds: entries another consumer of the group took but
  has not acknowledged for `--claim-idle` seconds (it crashed, or is stuck) are taken over.
  Entries the stream lost meanwhile (trimmed while still pending) are reported as lost.
- Dedupe on `keyId`: the upstream may emit one WhatsApp message twice on messages.upsert
  (a message sent through the API). The first entry of a keyId claims it (SET NX with a TTL);
  a later entry with the same keyId is acknowledged and skipped. A redelivery of the same
  entry (after a crash before XACK) is handled again: at-least-once, so `handle` should be
  idempotent for that narrow window.
- SIGTERM/SIGINT: finish the entry at hand, exit 0.

`handle()` stands for your business logic; here it prints one JSON line per message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any, cast

import redis

log = logging.getLogger("consumer")
STOP = threading.Event()
SEEN_TTL = 24 * 3600  # seconds a keyId is remembered; duplicates arrive within seconds


def handle(message: dict[str, Any], source: str) -> None:
    """Your business logic: called once per WhatsApp message (not per duplicate)."""
    line = {
        "keyId": message.get("keyId"),
        "remoteJid": message.get("keyRemoteJid"),
        "messageType": message.get("messageType"),
        "fromMe": message.get("keyFromMe"),
        "source": source,
    }
    print(json.dumps(line), flush=True)  # noqa: T201 - the example's visible effect


class Consumer:
    def __init__(self, client: redis.Redis, args: argparse.Namespace) -> None:
        self.r = client
        self.stream: str = args.stream
        self.group: str = args.group
        self.name: str = args.consumer
        self.args = args

    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s from the beginning", self.group, self.stream)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def process(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Handle one entry, then acknowledge it (or leave it pending on failure)."""
        try:
            message = json.loads(fields[b"data"])
        except (KeyError, ValueError):
            log.error("entry %s has no JSON data field; acknowledging it to skip it", entry_id)
            self.r.xack(self.stream, self.group, entry_id)
            return
        key_id = message.get("keyId") if isinstance(message, dict) else None
        seen = f"{self.group}:seen:{key_id}"
        if (
            key_id
            and not self.r.set(seen, entry_id, nx=True, ex=SEEN_TTL)
            and self.r.get(seen) != entry_id  # another entry carried this message already
        ):
            log.info("entry %s repeats keyId %s: skipped", entry_id.decode(), key_id)
            self.r.xack(self.stream, self.group, entry_id)
            return
        try:
            handle(message, fields.get(b"source", b"").decode())
        except Exception:
            log.exception("handling %s failed; it stays pending and is retried", entry_id)
            if key_id:
                self.r.delete(seen)
            return
        self.r.xack(self.stream, self.group, entry_id)

    def claim(self) -> int:
        """Take over entries idle for --claim-idle seconds; the number handled."""
        start: bytes | str = "0-0"
        handled = 0
        while not STOP.is_set():
            reply = self.r.xautoclaim(
                self.stream,
                self.group,
                self.name,
                min_idle_time=int(self.args.claim_idle * 1000),
                start_id=start,
                count=100,
            )
            start, entries = reply[0], reply[1]
            for entry_id in reply[2] if len(reply) > 2 else []:  # Redis 7+: deleted IDs
                log.warning("entry %s was trimmed before it was acknowledged: lost", entry_id)
            for entry_id, fields in entries:
                self.process(entry_id, fields)
                handled += 1
            if start in (b"0-0", "0-0"):
                break
        return handled

    def run(self) -> None:
        self.ensure_group()
        next_claim = 0.0
        idle_since = time.monotonic()
        while not STOP.is_set():
            handled = 0
            if time.monotonic() >= next_claim:
                handled += self.claim()
                next_claim = time.monotonic() + self.args.claim_every
            reply = cast(
                list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
                self.r.xreadgroup(
                    self.group,
                    self.name,
                    {self.stream: ">"},
                    count=self.args.batch,
                    block=int(self.args.block * 1000),
                ),
            )
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self.process(entry_id, fields)
                    handled += 1
            now = time.monotonic()
            if handled:
                idle_since = now
            elif self.args.exit_when_idle and now - idle_since >= self.args.exit_when_idle:
                log.info("nothing to do for %.0fs: exiting", self.args.exit_when_idle)
                return


def _stop(signum: int, frame: FrameType | None) -> None:
    STOP.set()  # the loop finishes the entry at hand and returns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream", default="messages.upsert")
    parser.add_argument("--group", default="billing")
    parser.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--batch", type=int, default=100, help="entries per XREADGROUP")
    parser.add_argument("--block", type=float, default=1.0, help="seconds XREADGROUP waits")
    parser.add_argument("--claim-idle", type=float, default=60.0, help="seconds before takeover")
    parser.add_argument("--claim-every", type=float, default=30.0, help="seconds between claims")
    parser.add_argument("--exit-when-idle", type=float, default=0.0, help="0: run until SIGTERM")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # The URL from the environment: a password on the command line would show in `ps`.
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        Consumer(client, args).run()
    except redis.ConnectionError as exc:
        log.error("Redis is not reachable: %s", exc)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
