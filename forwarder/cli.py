"""Command line: `forwarder run | check-config | simulate | watch | fleet`.

Secrets never come from argv (visible in ps and shell history): only from files, the
environment, or systemd credentials, as the configuration says.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import urllib.request
from collections.abc import Sequence
from typing import Any

import redis

from forwarder import __version__
from forwarder.config import load_config
from forwarder.errors import ConfigError, ExitCode
from forwarder.spool import SpoolError

log = logging.getLogger("forwarder")
_PAUSE = threading.Event()  # never set: an interruptible sleep for the watch loop


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "simulate":
        # The simulator has its own argument parser (and a `token` sub-command).
        try:
            import forwarder_sim
        except ImportError as exc:  # a service install has no PyJWT: the simulator is an extra
            sys.stderr.write(
                f"forwarder simulate needs the simulator's extra ({exc.name} is missing): "
                "pip install 'forwarder[sim]'\n"
            )
            return ExitCode.CONFIG
        return forwarder_sim.main(args[1:])
    if args and args[0] == "fleet":  # `fleet status|drain` has its own parser
        from forwarder.fleet.cli import main as fleet_main

        return fleet_main(args[1:])
    parser = _parser()
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help()
        return ExitCode.CONFIG
    handler = {"run": _run, "check-config": _check_config, "watch": _watch}[ns.command]
    return int(handler(ns))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forwarder",
        description="Forward a CodeChat WhatsApp API WebSocket event feed into Redis streams.",
    )
    parser.add_argument("--version", action="version", version=f"forwarder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the forwarder until SIGTERM/SIGINT")
    run.add_argument("--config", help="TOML configuration file (default: $FORWARDER_CONFIG)")
    run.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    check = sub.add_parser(
        "check-config", help="validate the configuration and print it with secrets redacted"
    )
    check.add_argument("--config", help="TOML configuration file (default: $FORWARDER_CONFIG)")
    sub.add_parser("simulate", help="run a local stand-in for the upstream server (see --help)")
    sub.add_parser("fleet", help="fleet mode: `fleet status`, `fleet drain` (see --help)")
    watch = sub.add_parser("watch", help="live per-event view of a running forwarder")
    watch.add_argument("--status-url", default="http://127.0.0.1:9108/status")
    watch.add_argument("--redis-url", help="also show each stream's length (XLEN)")
    watch.add_argument("--interval", type=float, default=1.0)
    watch.add_argument("--count", type=int, default=0, help="refreshes before exiting (0: never)")
    return parser


def _run(ns: argparse.Namespace) -> ExitCode:
    from forwarder.daemon import Forwarder
    from forwarder.logs import setup_logging
    from forwarder.notify import Notifier, watchdog_interval

    environ = dict(os.environ)
    if ns.log_level:
        environ["FORWARDER_LOG_LEVEL"] = ns.log_level
    setup_logging(environ.get("FORWARDER_LOG_LEVEL", "INFO").upper())
    try:
        config = load_config(ns.config, environ)
        setup_logging(config.log_level)
        if config.fleet.enabled:
            # Phase 1 of fleet mode ships the parts (forwarder/fleet/); until the daemon
            # runs them, a second process would fight this one for every feed.
            raise ConfigError(
                "[fleet] enabled = true: fleet mode is not wired into `forwarder run` yet "
                "(see docs/fleet.md); run a single forwarder with enabled = false"
            )
        forwarder = Forwarder(
            config,
            notifier=Notifier.from_env(os.environ),
            watchdog_every=watchdog_interval(os.environ),
            reload=lambda: load_config(ns.config, environ),
        )
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return ExitCode.CONFIG
    except SpoolError as exc:
        log.error("cannot start: %s", exc)
        return ExitCode.STARTUP
    try:
        return forwarder.run()
    except ConfigError as exc:  # e.g. the metrics port is taken
        log.error("cannot start: %s", exc)
        return ExitCode.STARTUP


def _check_config(ns: argparse.Namespace) -> ExitCode:
    try:
        config = load_config(ns.config, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"forwarder: configuration error: {exc}\n")
        return ExitCode.CONFIG
    sys.stdout.write(json.dumps(config.redacted(), indent=2) + "\n")
    sys.stderr.write("configuration OK\n")
    return ExitCode.OK


def _watch(ns: argparse.Namespace) -> ExitCode:
    """Redraw a table of /status (and stream lengths) every interval; used by `make run`."""
    client = redis.Redis.from_url(ns.redis_url, socket_timeout=2) if ns.redis_url else None
    shown = 0
    try:
        while ns.count == 0 or shown < ns.count:
            try:
                with urllib.request.urlopen(ns.status_url, timeout=2) as response:  # noqa: S310
                    status = json.load(response)
            except OSError as exc:
                sys.stderr.write(f"waiting for {ns.status_url}: {exc}\n")
            else:
                lengths = _stream_lengths(client, status)
                sys.stdout.write(_table(status, lengths, clear=sys.stdout.isatty()))
                sys.stdout.flush()
            shown += 1
            _PAUSE.wait(ns.interval)
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


def _stream_lengths(client: redis.Redis | None, status: dict[str, Any]) -> dict[str, int | None]:
    lengths: dict[str, int | None] = {}
    for sub in status["subscriptions"]:
        try:
            lengths[sub["stream"]] = int(client.xlen(sub["stream"])) if client else None
        except redis.RedisError:
            lengths[sub["stream"]] = None
    return lengths


def _table(status: dict[str, Any], lengths: dict[str, int | None], clear: bool) -> str:
    lines = [
        f"forwarder {status['version']}  up {status['uptime_seconds']:.0f}s  "
        f"ready={status['ready']}  redis errors={sum(status['redis']['errors'].values())}  "
        f"spool={status['spool']['pending_messages']}",
        "",
        f"{'SOURCE/EVENT':<34} {'STATE':<10} {'RECEIVED':>9} {'FORWARDED':>9} {'STREAM LEN':>10} "
        f"{'DLQ':>4} {'RECONN':>6} {'LAST MSG':>8}",
    ]
    for s in status["subscriptions"]:
        age = s["last_message_age_seconds"]
        length = lengths.get(s["stream"])
        lines.append(
            f"{s['source'] + '/' + s['event']:<34} {s['state']:<10} {s['received']:>9} "
            f"{s['forwarded']:>9} {'-' if length is None else length:>10} "
            f"{sum(s['dead_lettered'].values()):>4} {s['reconnects']:>6} "
            f"{'-' if age is None else f'{age:.1f}s':>8}"
        )
    return ("\x1b[H\x1b[2J" if clear else "") + "\n".join(lines) + "\n\n"


if __name__ == "__main__":
    sys.exit(main())
