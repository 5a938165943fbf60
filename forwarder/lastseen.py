"""Where each subscription's feed was last accounted for, kept across restarts of forwarder.

The upstream cannot resend, so the time forwarder itself is not running is blind time like
any other, and belongs in the gap stream. `lastseen.json` in the spool directory (which the
spool locks, so only one process uses it) holds, per subscription, the unix time up to which
its feed is accounted for: while connected, the moment of the save; while not receiving, the
start of the blind interval not yet recorded. It is saved every SAVE_INTERVAL seconds and at
the end of a shutdown (every gap then closed, so it holds the moment receiving stopped). The
next start gives each subscription found there a gap with cause `restart`, from that moment to
its first connection. After a crash the file is at most SAVE_INTERVAL old: the gap then starts
a little early (an upper bound, never a hole).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import orjson

from forwarder.stats import SubscriptionStats

log = logging.getLogger(__name__)

FILE_NAME = "lastseen.json"
# Seconds between two saves while running: a save of 10,000 marks costs ~20 ms of the
# interpreter lock, and a crash's restart gap starts at most this much early.
SAVE_INTERVAL = 10.0
_VERSION = 1

Marks = dict[tuple[str, str], float]  # (source, event) -> unix time


def heard_until(stats: SubscriptionStats, now: float) -> float:
    """Up to when this subscription's feed is accounted for: `now` while it is receiving, else
    the start of its open blind interval (a gap not yet recorded)."""
    since = stats.blind[1]
    return now if since is None else since


class LastSeen:
    """Reads and writes the state file. Not thread-safe: the daemon's main thread uses it."""

    def __init__(self, directory: Path) -> None:
        self._path = directory / FILE_NAME
        self._failing = False

    @property
    def path(self) -> Path:
        return self._path

    def load(self) -> Marks:
        """The marks of the previous run; empty (with a WARNING if damaged) when unusable."""
        try:
            data = orjson.loads(self._path.read_bytes())
            rows = data["subscriptions"] if data.get("version") == _VERSION else []
            return {(str(r[0]), str(r[1])): float(r[2]) / 1000 for r in rows}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            log.warning(
                "%s is unreadable (%s): the time forwarder was not running is not recorded as "
                "a gap this once",
                self._path,
                type(exc).__name__,
            )
            return {}

    def save(self, stats: Iterable[SubscriptionStats], now: float) -> None:
        """Write the marks of the configured subscriptions (atomically: temp file, rename)."""
        # [source, event, until ms]: lists, not dicts, and heard_until inlined, keep a
        # 10,000-row save cheap (the main thread does it every SAVE_INTERVAL).
        rows = [
            [s.source, s.event, int((now if (since := s.blind[1]) is None else since) * 1000)]
            for s in stats
            if s.configured
        ]
        tmp = self._path.with_suffix(".tmp")
        try:
            tmp.write_bytes(orjson.dumps({"version": _VERSION, "subscriptions": rows}))
            os.replace(tmp, self._path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._failing:  # once per episode, not every save
                log.warning("cannot write %s: %s", self._path, exc.strerror)
            self._failing = True
            return
        self._failing = False
