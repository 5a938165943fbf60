"""`forwarder tail`, `forwarder streams`, `forwarder dlq show`: look at the streams in Redis.

The Redis URL comes from `--config` (the `[redis]` table, TLS files included), else
FORWARDER_REDIS_URL, else `--redis-url` without a password (argv is visible in `ps`), else
redis://127.0.0.1:6379/0. No URL with a password is ever printed. None of these commands
writes to Redis: `tail --group G` only reads from G's position, it does not consume.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO, cast
from urllib.parse import urlsplit

import orjson
import redis

from forwarder.config import DEFAULT_REDIS_URL, Config, RedisConfig, load_config, redact_url
from forwarder.errors import ConfigError, ExitCode
from forwarder.logs import redact
from forwarder.redis_target import make_client
from forwarder.streaminfo import LagKind, NotAStream, StreamFacts, decode_text, observe

Entry = tuple[bytes, dict[bytes, bytes]]
HEAD_BYTES = 48  # bytes of a dead letter shown by `dlq show`
SUMMARY_CHARS = 60  # characters of message text shown by `tail`
_STOP = threading.Event()  # never set: tests bound the commands with --count


class ToolError(Exception):
    """A message for the user and the exit code to leave with."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the sub-commands to `forwarder`'s parser (each sets `handler`)."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML configuration file (default: $FORWARDER_CONFIG)")
        p.add_argument(
            "--redis-url",
            help="Redis URL without a password (default: FORWARDER_REDIS_URL, the config)",
        )
        p.add_argument("--json", action="store_true", help="one JSON object per line")

    tail = sub.add_parser("tail", help="follow a stream: one line per entry")
    common(tail)
    tail.add_argument("stream")
    tail.add_argument(
        "--group", help="start where this consumer group is (its undelivered entries); read-only"
    )
    tail.add_argument("--last", type=int, default=0, help="show the last N entries first")
    tail.add_argument("--count", type=int, default=0, help="exit after N entries (0: never)")
    tail.set_defaults(handler=_tail)
    streams = sub.add_parser(
        "streams", help="the streams forwarder writes: length, groups, lag, pending, dead letters"
    )
    common(streams)
    streams.add_argument("stream", nargs="*", help="these streams (default: the configuration's)")
    streams.set_defaults(handler=_streams)
    dlq = sub.add_parser("dlq", help="dead letters")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="COMMAND", required=True)
    show = dlq_sub.add_parser("show", help="decode a stream's dead letters")
    common(show)
    show.add_argument("stream", help="a stream forwarder writes (or its dead-letter stream)")
    show.add_argument("--count", type=int, default=20, help="the last N dead letters")
    show.set_defaults(handler=_dlq_show)


def run(ns: argparse.Namespace, handler: Callable[..., None]) -> ExitCode:
    """Run a sub-command; errors become one line on stderr and a named exit code."""
    target = "Redis"
    try:
        config = _config(ns)
        redis_config = _redis_config(ns, config)
        target = redact_url(redis_config.url)
        client = make_client(redis_config)
        try:
            handler(ns, client, config, sys.stdout)
        finally:
            client.close()
    except ConfigError as exc:
        sys.stderr.write(f"forwarder: configuration error: {exc}\n")
        return ExitCode.CONFIG
    except ToolError as exc:
        sys.stderr.write(f"forwarder: {exc}\n")
        return exc.code
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        sys.stderr.write(f"forwarder: cannot reach {target}: {redact(str(exc))}\n")
        return ExitCode.STARTUP
    except redis.RedisError as exc:
        sys.stderr.write(f"forwarder: {target} refused: {redact(str(exc))}\n")
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.OK
    except BrokenPipeError:  # `forwarder tail … | head`
        return ExitCode.OK
    return ExitCode.OK


def _config(ns: argparse.Namespace) -> Config | None:
    path = ns.config or os.environ.get("FORWARDER_CONFIG") or None
    return load_config(path, os.environ) if path else None


def _redis_config(ns: argparse.Namespace, config: Config | None) -> RedisConfig:
    if config is not None:
        return config.redis
    if ns.redis_url:
        if urlsplit(ns.redis_url).password is not None:
            raise ConfigError(
                "--redis-url: no password on the command line (ps shows it): set "
                "FORWARDER_REDIS_URL or use --config"
            )
        return RedisConfig(url=ns.redis_url)
    return RedisConfig(url=os.environ.get("FORWARDER_REDIS_URL", DEFAULT_REDIS_URL))


# -- forwarder tail -----------------------------------------------------------------------------


def _tail(ns: argparse.Namespace, client: redis.Redis, config: Config | None, out: TextIO) -> None:
    tail(client, ns.stream, out, group=ns.group, last=ns.last, count=ns.count, as_json=ns.json)


def tail(
    client: redis.Redis,
    stream: str,
    out: TextIO,
    *,
    group: str | None = None,
    last: int = 0,
    count: int = 0,
    as_json: bool = False,
    block_ms: int = 1000,
) -> None:
    """Print entries of `stream` as they arrive (blocking until `count` entries, or forever)."""
    facts = _facts(client, stream)
    shown = 0
    if group is not None:
        match = [g for g in facts.groups if g.name == group]
        if not match:
            names = ", ".join(g.name for g in facts.groups) or "none"
            raise ToolError(
                f"stream {stream!r} has no consumer group {group!r} (groups: {names})",
                ExitCode.CONFIG,
            )
        start = match[0].last_delivered
    else:
        start = facts.last_id
        if last > 0:
            recent = cast(list[Entry], client.xrevrange(stream, "+", "-", count=last))
            for entry in reversed(recent):
                _print_entry(out, stream, entry, as_json)
                shown += 1
                if count and shown >= count:
                    return
    while not _STOP.is_set():
        reply = cast(
            list[tuple[bytes, list[Entry]]],
            client.xread({stream: start}, count=100, block=block_ms),
        )
        for _, entries in reply:
            for entry in entries:
                _print_entry(out, stream, entry, as_json)
                start = entry[0].decode()
                shown += 1
                if count and shown >= count:
                    return
        out.flush()


def _print_entry(out: TextIO, stream: str, entry: Entry, as_json: bool) -> None:
    entry_id, raw = entry
    fields = {decode_text(k): decode_text(v) for k, v in raw.items()}
    if as_json:
        out.write(json.dumps({"stream": stream, "id": entry_id.decode(), "fields": fields}) + "\n")
        return
    when = _time(fields.get("received_at"), entry_id)
    who = "/".join(x for x in (fields.get("source"), fields.get("event")) if x) or "-"
    out.write(f"{when}  {entry_id.decode()}  {who}  {summarize(fields)}\n")


def _time(received_ms: str | None, entry_id: bytes) -> str:
    try:
        ms = int(received_ms) if received_ms else int(entry_id.split(b"-")[0])
    except ValueError:
        ms = int(entry_id.split(b"-")[0])
    stamp = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def summarize(fields: dict[str, str]) -> str:
    """A short, one-line description of an entry; never raises."""
    if "data" not in fields:  # a dead letter or a gap record
        if "reason" in fields:
            return f"dead letter: {fields['reason']}, {fields.get('size', '?')} bytes"
        if "cause" in fields:
            return f"gap: {fields['cause']} ({fields.get('start', '?')}..{fields.get('end', '?')})"
        return " ".join(f"{k}={_short(v, 20)}" for k, v in fields.items())
    try:
        data = orjson.loads(fields["data"])
    except orjson.JSONDecodeError:
        return _short(fields["data"], SUMMARY_CHARS)
    event = fields.get("event", "")
    try:
        return _summary(event, data)
    except (KeyError, TypeError, IndexError, AttributeError):
        return _short(fields["data"], SUMMARY_CHARS)


def _summary(event: str, data: Any) -> str:
    if isinstance(data, list):
        first = data[0] if data else {}
        key = first.get("remoteJid") or first.get("id") or "" if isinstance(first, dict) else ""
        return f"{len(data)} item{'s' if len(data) != 1 else ''}" + (f", {key}" if key else "")
    if event in ("messages.upsert", "send.message"):
        direction = "to" if data.get("keyFromMe") else "from"
        text = _message_text(data.get("content"))
        parts = [str(data.get("messageType", "?")), direction, str(data.get("keyRemoteJid", "?"))]
        if data.get("keyId"):
            parts.append(f"keyId={data['keyId']}")
        return " ".join(parts) + (f" {json.dumps(_short(text, SUMMARY_CHARS))}" if text else "")
    if event == "messages.update":
        return (
            f"{data.get('status', 'update')} {data.get('remoteJid', '?')} id={data.get('id', '?')}"
        )
    if event == "connection.update":
        return f"{data.get('instance', '?')} {data.get('state', '?')} ({data.get('statusReason')})"
    if event == "qrcode.updated":
        return f"QR code #{data.get('count', '?')}"
    if event == "presence.update":
        states = {v.get("lastKnownPresence") for v in (data.get("presences") or {}).values()}
        return f"{data.get('id', '?')} {','.join(sorted(s for s in states if s)) or '?'}"
    if event == "call.upsert":
        return f"call {data.get('status', '?')} from {data.get('from', '?')}"
    if event == "group-participants.update":
        return f"{data.get('action', '?')} in {data.get('id', '?')}"
    keys = ", ".join(list(data)[:4]) if isinstance(data, dict) else type(data).__name__
    return f"{{{keys}}}"


def _message_text(content: Any) -> str:
    if not isinstance(content, dict):
        return ""
    for key in ("text", "caption", "fileName"):
        value = content.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# -- forwarder streams --------------------------------------------------------------------------


def _streams(
    ns: argparse.Namespace, client: redis.Redis, config: Config | None, out: TextIO
) -> None:
    names = _stream_names(ns.stream, config)
    rows = [(name, _facts(client, name), _dlq_length(client, name, config)) for name in names]
    if ns.json:
        for name, facts, dlq in rows:
            out.write(json.dumps(_stream_json(name, facts, dlq)) + "\n")
        return
    out.write(streams_table(rows))


def _stream_names(explicit: Sequence[str], config: Config | None) -> list[str]:
    if explicit:
        return list(dict.fromkeys(explicit))
    if config is None:
        raise ToolError(
            "name the streams, or pass --config (or FORWARDER_CONFIG) to list the ones "
            "forwarder writes",
            ExitCode.CONFIG,
        )
    return list(dict.fromkeys(sub.stream for sub in config.subscriptions()))


def _dead_letter_keys(stream: str, config: Config | None) -> list[str]:
    if config is None:
        return [f"{stream}:dlq"]
    keys = [s.dead_letter_stream for s in config.subscriptions() if s.stream == stream]
    if keys:
        return list(dict.fromkeys(keys))
    template = config.redis.dead_letter_stream
    return [template.format(stream=stream)] if "{stream}" in template else []


def _dlq_length(client: redis.Redis, stream: str, config: Config | None) -> int:
    return sum(int(client.xlen(key)) for key in _dead_letter_keys(stream, config))


def _facts(client: redis.Redis, stream: str) -> StreamFacts:
    try:
        return observe(client, stream)
    except NotAStream as exc:
        raise ToolError(str(exc), ExitCode.CONFIG) from None


def _age(ms: int | None) -> str:
    if ms is None:
        return "-"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def streams_table(rows: Iterable[tuple[str, StreamFacts, int]]) -> str:
    """The `forwarder streams` table: one line per (stream, group); '-' where none."""
    header = ("STREAM", "LENGTH", "GROUP", "CONSUMERS", "LAG", "PENDING", "OLDEST PENDING", "DLQ")
    lines: list[tuple[str, ...]] = [header]
    for name, facts, dlq in rows:
        length = str(facts.length) if facts.exists else "(none)"
        if not facts.groups:
            lines.append((name, length, "-", "-", "-", "-", "-", str(dlq)))
        for g in facts.groups:
            approx = "~" if g.lag_kind is LagKind.ESTIMATE else ""
            lines.append(
                (
                    name,
                    length,
                    g.name,
                    str(g.consumers),
                    f"{approx}{g.lag}",
                    str(g.pending),
                    _age(g.oldest_pending_idle_ms),
                    str(dlq),
                )
            )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = []
    for row in lines:
        cells = [
            cell.ljust(widths[i]) if i in (0, 2) else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        text.append("  ".join(cells).rstrip())
    return "\n".join(text) + "\n"


def _stream_json(name: str, facts: StreamFacts, dlq: int) -> dict[str, Any]:
    return {
        "stream": name,
        "exists": facts.exists,
        "length": facts.length,
        "dead_letters": dlq,
        "groups": [
            {
                "group": g.name,
                "consumers": g.consumers,
                "lag": g.lag,
                "lag_estimated": g.lag_kind is LagKind.ESTIMATE,
                "pending": g.pending,
                "oldest_pending_idle_seconds": (
                    None if g.oldest_pending_idle_ms is None else g.oldest_pending_idle_ms / 1000
                ),
                "last_delivered_id": g.last_delivered,
            }
            for g in facts.groups
        ],
    }


# -- forwarder dlq show -------------------------------------------------------------------------


def _dlq_show(
    ns: argparse.Namespace, client: redis.Redis, config: Config | None, out: TextIO
) -> None:
    keys = _dead_letter_keys(ns.stream, config)
    is_dlq = config is not None and any(
        s.dead_letter_stream == ns.stream for s in config.subscriptions()
    )
    if is_dlq or ns.stream.endswith(":dlq") or not keys:
        keys = [ns.stream]
    for key in keys:
        entries = cast(list[Entry], client.xrevrange(key, "+", "-", count=ns.count))
        if not entries and not ns.json:
            out.write(f"{key}: no dead letters\n")
        for entry in reversed(entries):
            out.write(dead_letter_line(key, entry, ns.json) + "\n")


def dead_letter_line(key: str, entry: Entry, as_json: bool) -> str:
    """One decoded dead letter: when, where from, why, how big, and the head of its bytes."""
    entry_id, raw = entry
    fields = {decode_text(k): decode_text(v) for k, v in raw.items()}
    try:
        data = base64.b64decode(fields.get("data_base64", ""), validate=True)
    except ValueError:
        data = b""
    head = data[:HEAD_BYTES]
    if as_json:
        doc: dict[str, Any] = {"stream": key, "id": entry_id.decode(), **fields}
        doc.pop("data_base64", None)
        doc["head"] = head.decode("utf-8", "backslashreplace")
        doc["head_hex"] = head.hex()
        return json.dumps(doc)
    size = fields.get("size", str(len(data)))
    extra = ""
    if fields.get("truncated") == "1":
        extra = f" (truncated, sha256 {fields.get('sha256', '?')[:16]}…)"
    shown = repr(head)[2:-1] + ("…" if len(data) > HEAD_BYTES else "")
    error = f"  error: {_short(fields['error'], 80)}" if "error" in fields else ""
    who = "/".join(x for x in (fields.get("source"), fields.get("event")) if x) or "-"
    return (
        f"{_time(fields.get('received_at'), entry_id)}  {entry_id.decode()}  {who}  "
        f"{fields.get('reason', '?')}  {size} bytes{extra}  {shown}{error}"
    )
