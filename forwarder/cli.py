"""Command line: `forwarder run | check-config | discover | simulate | watch | tail | streams`,
`forwarder dlq show`.

Secrets never come from argv (visible in ps and shell history): only from files, the
environment, or systemd credentials, as the configuration says.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from forwarder import __version__
from forwarder.config import load_config
from forwarder.errors import ConfigError, ExitCode
from forwarder.spool import SpoolError

log = logging.getLogger("forwarder")


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
    parser = _parser()
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help()
        return ExitCode.CONFIG
    if hasattr(ns, "handler"):  # streamtools' sub-commands
        from forwarder import streamtools

        return int(streamtools.run(ns, ns.handler))
    handler = {
        "run": _run,
        "check-config": _check_config,
        "discover": _discover,
        "watch": _watch,
    }[ns.command]
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
    discover = sub.add_parser(
        "discover",
        help="list what [[discovery]] would subscribe to now (one listing, no WebSocket)",
    )
    discover.add_argument("--config", help="TOML configuration file (default: $FORWARDER_CONFIG)")
    discover.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("simulate", help="run a local stand-in for the upstream server (see --help)")
    watch = sub.add_parser("watch", help="live per-event view of a running forwarder")
    watch.add_argument("--status-url", default="http://127.0.0.1:9108/status")
    watch.add_argument("--redis-url", help="also show each stream's length (XLEN)")
    watch.add_argument("--interval", type=float, default=1.0)
    watch.add_argument("--count", type=int, default=0, help="refreshes before exiting (0: never)")
    watch.add_argument(
        "--view",
        choices=("auto", "table", "summary"),
        default="auto",
        help="a row per subscription, or counts and the unhealthy ones (auto: the table "
        "when it fits the terminal)",
    )
    from forwarder import streamtools

    streamtools.register(sub)  # tail, streams, dlq show
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


def _discover(ns: argparse.Namespace) -> ExitCode:
    """One listing per [[discovery]] table through the daemon's own rules and desired set.

    Exit codes: OK when every table listed and every instance is usable; CONFIG when a key
    was refused or unreadable, or an instance is refused (name clash); FAILURE when a listing
    failed otherwise (unreachable, 5xx, garbage).
    """
    from forwarder.desired import desired
    from forwarder.discovery import DiscoveryPoller

    try:
        config = load_config(ns.config, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"forwarder: configuration error: {exc}\n")
        return ExitCode.CONFIG
    if not config.discovery:
        sys.stderr.write("forwarder: the configuration has no [[discovery]] table\n")
        return ExitCode.CONFIG
    poller = DiscoveryPoller(config.discovery, lambda: None)
    # The report below says what failed; the poller's log lines are written for a daemon
    # ("keeping ... retrying in 30s") and would only repeat it misleadingly.
    quiet = logging.getLogger("forwarder.discovery")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        for table in config.discovery:
            poller.poll(table.name)
    finally:
        quiet.setLevel(level)
    refused = desired(config, poller.discovered()).refused
    poller.refused(refused)
    now = time.time()
    report = []
    code = ExitCode.OK
    for table, status in zip(config.discovery, poller.status(), strict=True):
        kind = status["last_error_kind"]
        if kind in ("unauthorized", "key") or status["refused"]:
            code = ExitCode.CONFIG
        elif kind is not None and code is ExitCode.OK:
            code = ExitCode.FAILURE
        report.append(
            {
                "discovery": table.name,
                "api_url": status["api_url"],
                "ws_url": table.ws_url,
                "stream": table.stream,
                "error": None if kind is None else f"{kind}: {status['last_error']}",
                "instances": [
                    {
                        "name": i.name,
                        "connection_status": i.status,
                        "events": 0 if i.name in status["refused"] else len(table.events),
                        "token_expires_at": i.expires_at,
                    }
                    for i in poller.instances(table.name)
                ],
                "refused": status["refused"],
                "unusable": status["invalid"],
            }
        )
    if ns.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return code
    for doc in report:
        sys.stdout.write(_discovery_table(doc, now))
    return code


def _discovery_table(doc: dict[str, Any], now: float) -> str:
    instances = doc["instances"]
    lines = [
        f"discovery {doc['discovery']} ({doc['api_url']}): {len(instances)} instances, "
        f"streams {doc['stream']!r}, WebSocket {doc['ws_url']}"
    ]
    if doc["error"]:
        lines.append(f"  listing failed: {doc['error']}")
    if instances:
        lines.append(f"  {'INSTANCE':<32} {'STATUS':<8} {'EVENTS':>6}  TOKEN EXPIRES")
    for i in instances:
        exp = i["token_expires_at"]
        if exp is None:
            expiry = "never"
        else:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))
            left = exp - now
            expiry = f"{when} (expired)" if left <= 0 else f"{when} (in {left / 60:.0f} min)"
        lines.append(
            f"  {i['name']:<32} {i['connection_status'] or '-':<8} {i['events']:>6}  {expiry}"
        )
    for name, reason in doc["refused"].items():
        lines.append(f"  not subscribed: {name}: {reason}")
    for name, reason in doc["unusable"].items():
        lines.append(f"  unusable element: {name}: {reason}")
    return "\n".join(lines) + "\n\n"


def _watch(ns: argparse.Namespace) -> ExitCode:
    """Redraw /status (and stream lengths) every interval; used by `make run`."""
    from forwarder import watch

    return watch.run(ns.status_url, ns.redis_url, ns.interval, ns.count, ns.view)


if __name__ == "__main__":
    sys.exit(main())
