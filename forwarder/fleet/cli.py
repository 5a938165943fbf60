"""`forwarder fleet status` and `forwarder fleet drain`: the fleet as Redis sees it.

Both read the same configuration file as `forwarder run` (for the Redis URL, the [fleet]
group and the subscriptions) and talk to Redis only, not to the members' HTTP ports.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from forwarder.config import Config, load_config, redact_url
from forwarder.errors import ConfigError, ExitCode, FleetError
from forwarder.fleet.keys import Key, sub_id
from forwarder.fleet.store import FleetSnapshot, RedisFleetStore
from forwarder.redis_target import make_client

_PAUSE = threading.Event()  # never set: an interruptible sleep while waiting for a drain


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="forwarder fleet", description="Members and lease owners of a forwarder fleet."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    status = sub.add_parser("status", help="print the members and who owns each subscription")
    status.add_argument("--config", help="TOML configuration file (default: $FORWARDER_CONFIG)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    drain = sub.add_parser(
        "drain", help="ask a member to hand everything over and take no new subscription"
    )
    drain.add_argument("--config", help="TOML configuration file (default: $FORWARDER_CONFIG)")
    drain.add_argument(
        "--member", help="member name (default: [fleet] name, or the one member on this host)"
    )
    drain.add_argument("--cancel", action="store_true", help="withdraw the drain request")
    drain.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait until it owns nothing (0: no)"
    )
    ns = parser.parse_args(list(argv))
    if ns.command is None:
        parser.print_help()
        return ExitCode.CONFIG
    try:
        config = load_config(ns.config, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"forwarder fleet: configuration error: {exc}\n")
        return ExitCode.CONFIG
    client = make_client(config.redis)
    store = RedisFleetStore(client, config.fleet)
    try:
        if ns.command == "status":
            return _status(config, store, ns.json)
        return _drain(config, store, ns.member, ns.cancel, ns.wait)
    except FleetError as exc:
        sys.stderr.write(f"forwarder fleet: cannot read the fleet from Redis: {exc}\n")
        return ExitCode.FAILURE
    finally:
        client.close()


def _status(config: Config, store: RedisFleetStore, as_json: bool) -> int:
    if not config.fleet.enabled:
        sys.stderr.write("note: [fleet] enabled is not true in this configuration\n")
    snap = store.snapshot()
    report = status_report(snap, [sub.key for sub in config.subscriptions()], config)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(format_report(report))
    return ExitCode.OK


def status_report(snap: FleetSnapshot, configured: Sequence[Key], config: Config) -> dict[str, Any]:
    """The fleet as plain data: members (live or gone), and every subscription with its
    owner, whether it has a lease in Redis or is only configured here."""
    members = []
    owned: dict[str, int] = {}
    for view in snap.leases:
        if view.token is not None:
            owned[view.token.member] = owned.get(view.token.member, 0) + 1
    for name, beat, record in snap.members:
        members.append(
            {
                "name": name,
                "state": (
                    "gone"
                    if record is None
                    else "draining"
                    if record.draining or name in snap.drain
                    else "live"
                ),
                "host": record.host if record else None,
                "pid": record.pid if record else None,
                "version": record.version if record else None,
                "owned": owned.get(name, 0),
                "candidates": record.candidates if record else None,
                "last_heartbeat_age_seconds": round((snap.server_ms - beat) / 1000, 3),
                "drain_requested": name in snap.drain,
            }
        )
    by_key = {view.key: view for view in snap.leases}
    subscriptions = []
    for key in sorted(set(configured) | set(by_key)):
        found = by_key.get(key)
        token = found.token if found else None
        move = found.handover if found else None
        subscriptions.append(
            {
                "subscription": sub_id(key),
                "owner": token.member if token else None,
                "fence": token.fence if token else None,
                "ttl_seconds": round(found.ttl_ms / 1000, 3) if found else None,
                "handover": (
                    None if move is None else {"to": move.target, "state": move.state.value}
                ),
            }
        )
    return {
        "group": config.fleet.group,
        "redis": redact_url(config.redis.url),
        "epoch": _utc(snap.epoch_ms),
        "members": members,
        "subscriptions": subscriptions,
        "owned": sum(1 for s in subscriptions if s["owner"]),
        "unowned": sum(1 for s in subscriptions if not s["owner"]),
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"fleet group {report['group']!r} on {report['redis']} (state kept since "
        f"{report['epoch'] or 'never'})",
        "",
        f"{'MEMBER':<28} {'STATE':<9} {'HOST':<20} {'PID':>7} {'OWNED':>6}  LAST HEARTBEAT",
    ]
    for m in report["members"]:
        lines.append(
            f"{m['name']:<28} {m['state']:<9} {m['host'] or '-':<20} {m['pid'] or '-':>7} "
            f"{m['owned']:>6}  {m['last_heartbeat_age_seconds']:.1f}s ago"
        )
    if not report["members"]:
        lines.append("(no member has joined)")
    lines += ["", f"{'SUBSCRIPTION':<44} {'OWNER':<28} {'FENCE':>6} {'TTL':>6}  HANDOVER"]
    for s in report["subscriptions"]:
        move = s["handover"]
        fence = "-" if s["fence"] is None else str(s["fence"])
        ttl = "-" if s["ttl_seconds"] is None else f"{s['ttl_seconds']:.1f}s"
        moving = "" if move is None else f"-> {move['to']} ({move['state']})"
        lines.append(
            f"{s['subscription']:<44} {s['owner'] or '(no owner)':<28} {fence:>6} {ttl:>6}  "
            + moving
        )
    lines += [
        "",
        f"{len(report['subscriptions'])} subscriptions: {report['owned']} owned, "
        f"{report['unowned']} without an owner",
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _drain(
    config: Config, store: RedisFleetStore, member: str | None, cancel: bool, wait: float
) -> int:
    snap = store.snapshot()
    live = {name: record for name, _, record in snap.members if record is not None}
    name = member or config.fleet.name or _the_member_on_this_host(live)
    if name is None:
        here = [n for n, r in live.items() if r.host == socket.gethostname()]
        sys.stderr.write(
            "forwarder fleet drain: say which member with --member NAME "
            f"(live members: {', '.join(sorted(live)) or 'none'}; on this host: "
            f"{', '.join(sorted(here)) or 'none'})\n"
        )
        return ExitCode.CONFIG
    if not cancel and name not in live:
        sys.stderr.write(
            f"forwarder fleet drain: no live member is named {name!r} "
            f"(live members: {', '.join(sorted(live)) or 'none'})\n"
        )
        return ExitCode.CONFIG
    store.request_drain(name, cancel=cancel)
    if cancel:
        sys.stdout.write(f"drain of {name} withdrawn: it takes subscriptions again\n")
        return ExitCode.OK
    sys.stdout.write(f"drain of {name} requested: it hands its subscriptions over\n")
    if wait <= 0:
        return ExitCode.OK
    waited = 0.0
    while waited < wait:
        left = sum(
            1 for lease in store.snapshot().leases if lease.token and lease.token.member == name
        )
        if left == 0:
            sys.stdout.write(f"{name} owns no subscription any more\n")
            return ExitCode.OK
        _PAUSE.wait(0.5)
        waited += 0.5
    sys.stderr.write(f"forwarder fleet drain: {name} still owns {left} subscriptions\n")
    return ExitCode.FAILURE


def _the_member_on_this_host(live: dict[str, Any]) -> str | None:
    here = [name for name, record in live.items() if record.host == socket.gethostname()]
    return here[0] if len(here) == 1 else None


def _utc(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
