"""Command line: `forwarder run | check-config | discover | simulate | watch | tail | streams`,
`forwarder dlq show`, `forwarder fleet status | drain`.

Secrets never come from argv (visible in ps and shell history): only from files, the
environment, or systemd credentials, as the configuration says.

`forwarder run` installs its signal handlers (signals.py) before importing anything slow,
so a SIGTERM or SIGHUP during start-up is handled instead of killing the process: this
module's top imports only what that needs, everything else is imported where it is used.
Every flag is checked by argparse, so a bad value is a usage error naming the flag (exit 2)
rather than a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forwarder import __version__
from forwarder.errors import ExitCode
from forwarder.signals import StartupSignals

# Even argparse, logging and typing are imported only once the handlers are in place: together
# they take ~30 ms, a third of the time before `main` runs.
TYPE_CHECKING = False  # mypy reads a name TYPE_CHECKING as true, without importing typing
if TYPE_CHECKING:
    import argparse
    from typing import Any


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # First of all, before the imports and the configuration that make start-up slow.
    startup = StartupSignals().install() if args[:1] == ["run"] else None
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
    if ns.command == "run":
        return int(_run(ns, startup or StartupSignals().install()))
    if hasattr(ns, "handler"):  # streamtools' sub-commands
        from forwarder import streamtools

        return int(streamtools.run(ns, ns.handler))
    handler = {"check-config": _check_config, "discover": _discover, "watch": _watch}[ns.command]
    return int(handler(ns))


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="forwarder",
        description="Forward a CodeChat WhatsApp API WebSocket event feed into Redis streams.",
    )
    parser.add_argument("--version", action="version", version=f"forwarder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the forwarder until SIGTERM/SIGINT")
    run.add_argument("--config", help="TOML configuration file (default: $FORWARDER_CONFIG)")
    run.add_argument(
        "--log-level", type=_log_level, help="DEBUG, INFO, WARNING or ERROR (default: INFO)"
    )
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
    sub.add_parser("fleet", help="fleet mode: `fleet status`, `fleet drain` (see --help)")
    watch = sub.add_parser("watch", help="live per-event view of a running forwarder")
    watch.add_argument("--status-url", type=_http_url, default="http://127.0.0.1:9108/status")
    watch.add_argument("--redis-url", type=_redis_url, help="also show each stream's length")
    watch.add_argument("--interval", type=_seconds, default=1.0, help="seconds between refreshes")
    watch.add_argument(
        "--count", type=_count, default=0, help="refreshes before exiting (0: never)"
    )
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


# -- flag types: each raises ArgumentTypeError, which argparse turns into a usage error -------


def _log_level(text: str) -> str:
    import argparse

    from forwarder.config import LOG_LEVELS

    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return text.upper()


def _seconds(text: str) -> float:
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _count(text: str) -> int:
    import argparse

    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")
    return int(text)


def _http_url(text: str) -> str:
    import argparse
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        usable = parts.scheme in {"http", "https"} and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port beyond 65535 or not a number, an unbalanced '['
        usable = False
    if not usable:
        raise argparse.ArgumentTypeError(
            f"expected http://HOST:PORT/status with a port from 1 to 65535, got {text!r}"
        )
    return text


def _redis_url(text: str) -> str:
    import argparse

    from forwarder.addresses import check_redis_url
    from forwarder.errors import ConfigError

    try:
        check_redis_url(text, "the URL")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# -- commands ---------------------------------------------------------------------------------


def _run(ns: argparse.Namespace, startup: StartupSignals) -> ExitCode:
    import logging
    import os

    from forwarder.config import LOG_LEVELS, load_config
    from forwarder.daemon import Forwarder
    from forwarder.errors import ConfigError
    from forwarder.logs import setup_logging
    from forwarder.notify import Notifier, watchdog_interval
    from forwarder.spool import SpoolError

    log = logging.getLogger("forwarder")
    environ = dict(os.environ)
    if ns.log_level:
        environ["FORWARDER_LOG_LEVEL"] = ns.log_level
    # A level for the messages of loading; a bad FORWARDER_LOG_LEVEL is reported by load_config.
    level = environ.get("FORWARDER_LOG_LEVEL", "INFO").upper()
    setup_logging(level if level in LOG_LEVELS else "INFO")
    try:
        config = load_config(ns.config, environ)
        setup_logging(config.log_level)
        for warning in config.warnings():
            log.warning("%s", warning)
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
        return forwarder.run(startup)
    except ConfigError as exc:  # e.g. the metrics port is taken
        log.error("cannot start: %s", exc)
        return ExitCode.STARTUP


def _check_config(ns: argparse.Namespace) -> ExitCode:
    import json
    import os

    from forwarder.config import load_config
    from forwarder.errors import ConfigError

    try:
        config = load_config(ns.config, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"forwarder: configuration error: {exc}\n")
        return ExitCode.CONFIG
    sys.stdout.write(json.dumps(config.redacted(), indent=2) + "\n")
    for warning in config.warnings():
        sys.stderr.write(f"forwarder: warning: {warning}\n")
    sys.stderr.write("configuration OK\n")
    return ExitCode.OK


def _discover(ns: argparse.Namespace) -> ExitCode:
    """One listing per [[discovery]] table through the daemon's own rules and desired set.

    Exit codes: OK when every table listed and every instance is usable; CONFIG when a key
    was refused or unreadable, or an instance is refused (name clash); FAILURE when a listing
    failed otherwise (unreachable, 5xx, garbage).
    """
    import json
    import logging
    import os
    import time

    from forwarder.config import load_config
    from forwarder.desired import desired
    from forwarder.discovery import DiscoveryPoller
    from forwarder.errors import ConfigError

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
    import time

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
