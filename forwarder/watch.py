"""`forwarder watch`: a live view of a running forwarder's /status (what `make run` shows).

Two views. The table has a row per subscription (and, with --redis-url, each stream's
length). When the rows do not fit the terminal (10,000 subscriptions do not), the summary
shows the counts per state and problem, a row per event, and the unhealthy subscriptions
for as many lines as are left. `--view` forces one; `auto` picks by the terminal's height
(`LINES` counts as one; output that is not a terminal has no height: the table).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

import redis

from forwarder.errors import ExitCode

VIEWS = ("auto", "table", "summary")
TABLE_HEADER_LINES = 3  # the status line, a blank line, the column titles
_PAUSE = threading.Event()  # never set: an interruptible sleep between refreshes


def run(
    status_url: str,
    redis_url: str | None = None,
    interval: float = 1.0,
    count: int = 0,
    view: str = "auto",
    out: TextIO = sys.stdout,
    terminal: Callable[[], tuple[int, int]] | None = None,
) -> ExitCode:
    """Redraw every `interval` seconds, `count` times (0: until Ctrl+C). Blocking.

    `terminal` returns (columns, lines), 0 lines meaning "no terminal": by default the
    size of `out` when it is a terminal, `COLUMNS`/`LINES` when set, else (0, 0).
    """
    size = terminal or _terminal_size
    client = redis.Redis.from_url(redis_url, socket_timeout=2) if redis_url else None
    shown = 0
    try:
        while count == 0 or shown < count:
            columns, lines = size()
            try:
                text = refresh(status_url, client, view, columns, lines)
            except OSError as exc:
                sys.stderr.write(f"waiting for {status_url}: {exc}\n")
            else:
                clear = "\x1b[H\x1b[2J" if out.isatty() else ""
                out.write(clear + text + "\n")
                out.flush()
            shown += 1
            _PAUSE.wait(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if client is not None:
            client.close()
    return ExitCode.OK


def refresh(
    status_url: str, client: redis.Redis | None, view: str, columns: int, lines: int
) -> str:
    """One screen: fetch /status (and the full rows if the table needs them), render."""
    status = _fetch(status_url)
    if "summary" not in status:  # a forwarder before 0.2: rows only
        return table(status, status["subscriptions"], _stream_lengths(client, status), columns)
    total = len(status["subscriptions"]) if "subscriptions" in status else -1
    if total < 0:
        total = int(status["summary"]["subscriptions"])
    fits = lines == 0 or total + TABLE_HEADER_LINES <= lines
    if view == "table" or (view == "auto" and fits):
        rows = status.get("subscriptions")
        if rows is None:
            rows = _fetch(_with_query(status_url, "state=all"))["subscriptions"]
        return table(status, rows, _stream_lengths(client, status, rows), columns)
    return summary(status, columns, lines)


def _terminal_size() -> tuple[int, int]:
    size = shutil.get_terminal_size((0, 0))
    return size.columns, size.lines


def _fetch(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - an operator's URL
        data: dict[str, Any] = json.load(response)
    return data


def _with_query(url: str, query: str) -> str:
    parts = urllib.parse.urlsplit(url)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urllib.parse.urlunsplit(parts._replace(query=joined))


def _stream_lengths(
    client: redis.Redis | None, status: dict[str, Any], rows: list[dict[str, Any]] | None = None
) -> dict[str, int | None]:
    lengths: dict[str, int | None] = {}
    for sub in rows if rows is not None else status.get("subscriptions", []):
        try:
            lengths[sub["stream"]] = int(client.xlen(sub["stream"])) if client else None
        except redis.RedisError:
            lengths[sub["stream"]] = None
    return lengths


def _headline(status: dict[str, Any]) -> str:
    return (
        f"forwarder {status['version']}  up {status['uptime_seconds']:.0f}s  "
        f"ready={status['ready']}  redis errors={sum(status['redis']['errors'].values())}  "
        f"spool={status['spool']['pending_messages']}"
    )


def _fit(lines: list[str], columns: int) -> str:
    return "\n".join(line[:columns] if columns else line for line in lines)


def table(
    status: dict[str, Any],
    rows: list[dict[str, Any]],
    lengths: dict[str, int | None],
    columns: int = 0,
) -> str:
    """A row per subscription."""
    lines = [
        _headline(status),
        "",
        f"{'SOURCE/EVENT':<34} {'STATE':<10} {'RECEIVED':>9} {'FORWARDED':>9} {'STREAM LEN':>10} "
        f"{'DLQ':>4} {'RECONN':>6} {'LAST MSG':>8}",
    ]
    for s in rows:
        age = s["last_message_age_seconds"]
        length = lengths.get(s["stream"])
        lines.append(
            f"{s['source'] + '/' + s['event']:<34} {s['state']:<10} {s['received']:>9} "
            f"{s['forwarded']:>9} {'-' if length is None else length:>10} "
            f"{sum(s['dead_lettered'].values()):>4} {s['reconnects']:>6} "
            f"{'-' if age is None else f'{age:.1f}s':>8}"
        )
    return _fit(lines, columns) + "\n"


def summary(status: dict[str, Any], columns: int = 0, lines: int = 0) -> str:
    """Counts per state and problem, a row per event, then the unhealthy subscriptions for
    the lines that are left (0 lines: all of them)."""
    head = status["summary"]
    states = "  ".join(f"{name} {n}" for name, n in head["states"].items() if n)
    problems = ", ".join(f"{name} {n}" for name, n in head["problems"].items() if n)
    sources = status["sources"]
    sick_sources = sum(1 for s in sources.values() if s["unhealthy"])
    out = [
        _headline(status),
        f"{head['subscriptions']} subscriptions: {states or 'none'}"
        f"   unhealthy {head['unhealthy']}" + (f" ({problems})" if problems else ""),
        f"{len(sources)} sources, {sick_sources} with unhealthy subscriptions",
        "",
        f"{'EVENT':<28} {'SUBS':>6} {'CONNECTED':>9} {'UNHEALTHY':>9} {'RECEIVED':>11} "
        f"{'FORWARDED':>11} {'DLQ':>6} {'RECONN':>7}",
    ]
    for name, ev in status["events"].items():
        out.append(
            f"{name:<28} {ev['subscriptions']:>6} {ev['connected']:>9} {ev['unhealthy']:>9} "
            f"{ev['received']:>11} {ev['forwarded']:>11} {ev['dead_lettered']:>6} "
            f"{ev['reconnects']:>7}"
        )
    sick = status["unhealthy"]
    if sick:
        room = len(sick) if lines == 0 else max(0, lines - len(out) - 3)
        shown = sick[:room]
        more = head["unhealthy"] - len(shown)
        out += [
            "",
            f"UNHEALTHY {head['unhealthy']}"
            + (f" (showing {len(shown)}; /status?state=unhealthy lists all)" if more else ""),
            f"{'SOURCE/EVENT':<34} {'STATE':<10} {'PROBLEMS':<20} {'CLOSE':>5} {'HTTP':>4}  "
            "LAST ERROR",
        ]
        for s in shown:
            out.append(
                f"{s['source'] + '/' + s['event']:<34} {s['state']:<10} "
                f"{','.join(s['problems']):<20} {s['last_close_code'] or '-':>5} "
                f"{s['last_handshake_status'] or '-':>4}  {s['last_error'] or ''}"
            )
    return _fit(out, columns) + "\n"
