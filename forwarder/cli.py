"""Command line: `forwarder run | check-config | simulate | watch`.

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

    import redis


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # First of all, before the imports and the configuration that make start-up slow.
    startup = StartupSignals().install() if args[:1] == ["run"] else None
    if args and args[0] == "simulate":
        # The simulator has its own argument parser (and a `token` sub-command).
        import forwarder_sim

        return forwarder_sim.main(args[1:])
    parser = _parser()
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help()
        return ExitCode.CONFIG
    if ns.command == "run":
        return int(_run(ns, startup or StartupSignals().install()))
    handler = {"check-config": _check_config, "watch": _watch}[ns.command]
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
    sub.add_parser("simulate", help="run a local stand-in for the upstream server (see --help)")
    watch = sub.add_parser("watch", help="live per-event view of a running forwarder")
    watch.add_argument("--status-url", type=_http_url, default="http://127.0.0.1:9108/status")
    watch.add_argument("--redis-url", type=_redis_url, help="also show each stream's length")
    watch.add_argument("--interval", type=_seconds, default=1.0, help="seconds between refreshes")
    watch.add_argument(
        "--count", type=_count, default=0, help="refreshes before exiting (0: never)"
    )
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


def _watch(ns: argparse.Namespace) -> ExitCode:
    """Redraw a table of /status (and stream lengths) every interval; used by `make run`."""
    import json
    import threading
    import urllib.request

    import redis

    pause = threading.Event()  # never set: an interruptible sleep

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
            pause.wait(ns.interval)
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


def _stream_lengths(client: redis.Redis | None, status: dict[str, Any]) -> dict[str, int | None]:
    import redis

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
