"""``forwarder simulate``: run the simulator in the foreground, or mint a token."""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import orjson

from forwarder_sim import payloads
from forwarder_sim.instances import DEV_API_KEY
from forwarder_sim.server import Simulator
from forwarder_sim.tokens import DEV_SECRET, mint_token

_ALLOWED = frozenset(payloads.ALLOWED_EVENTS)


def _parse_rate(text: str) -> tuple[str, float]:
    event, sep, value = text.partition("=")
    if not sep or event not in _ALLOWED:
        raise argparse.ArgumentTypeError(f"expected EVENT=RATE with a known event, got {text!r}")
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad rate in {text!r}") from None
    if rate < 0:
        raise argparse.ArgumentTypeError(f"negative rate in {text!r}")
    return event, rate


def _secret_from(arg: str | None) -> tuple[str, str]:
    if arg:
        return arg, "--secret"
    env = os.environ.get("FORWARDER_SIM_SECRET")
    if env:
        return env, "FORWARDER_SIM_SECRET"
    return DEV_SECRET, "DEV_SECRET"


def _api_key_from(arg: str | None) -> tuple[str, str]:
    if arg:
        return arg, "--api-key"
    env = os.environ.get("FORWARDER_SIM_API_KEY")
    if env:
        return env, "FORWARDER_SIM_API_KEY"
    return DEV_API_KEY, "DEV_API_KEY"


def _main_token(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="forwarder simulate token", description="Print an upstream-style instance token."
    )
    parser.add_argument("--instance", required=True)
    parser.add_argument("--secret", help="default: $FORWARDER_SIM_SECRET, else DEV_SECRET")
    parser.add_argument("--expires-in", type=float, default=None, metavar="SECONDS")
    args = parser.parse_args(argv)
    secret, _ = _secret_from(args.secret)
    sys.stdout.write(mint_token(args.instance, secret, args.expires_in) + "\n")
    return 0


def _write_stats(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)  # atomic: readers see the old or the new file, never half of one


def main(argv: list[str] | None = None) -> int:
    """``forwarder simulate [...]`` and ``forwarder simulate token [...]``; returns exit code.

    Runs in the foreground until SIGINT or SIGTERM.
    """
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["token"]:
        return _main_token(args_in[1:])
    parser = argparse.ArgumentParser(
        prog="forwarder simulate",
        description="Run a local stand-in for the CodeChat whatsapp-api event WebSocket. "
        "Use 'forwarder simulate token --instance NAME' to mint a token.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8084)
    parser.add_argument("--secret", help="default: $FORWARDER_SIM_SECRET, else DEV_SECRET")
    parser.add_argument(
        "--api-key",
        help="the global key of GET /instance/fetchInstances "
        "(default: $FORWARDER_SIM_API_KEY, else DEV_API_KEY)",
    )
    parser.add_argument(
        "--rate",
        type=_parse_rate,
        action="append",
        default=[],
        metavar="EVENT=N",
        help="frames per second for EVENT (repeatable)",
    )
    parser.add_argument(
        "--default-rate",
        type=float,
        default=0.0,
        metavar="N",
        help="frames per second for every event upstream really sends (default 0: none)",
    )
    parser.add_argument(
        "--instance",
        action="append",
        default=[],
        metavar="NAME",
        help="create this instance at start: listed by GET /instance/fetchInstances, and its "
        "slots exist so traffic flows (and is dropped) before anyone connects (repeatable)",
    )
    parser.add_argument(
        "--frame-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="generate fixed-size frames (benchmarks) instead of realistic ones",
    )
    parser.add_argument("--seed", type=int, default=None, help="payload seed (default 0)")
    parser.add_argument(
        "--record", action="store_true", help="keep every delivered frame in memory"
    )
    parser.add_argument(
        "--check-expiration",
        action="store_true",
        help="reject expired tokens (default: ignore exp, like upstream EXPIRES_IN=0)",
    )
    parser.add_argument(
        "--stats-file", default=None, metavar="PATH", help="rewrite stats JSON here every second"
    )
    parser.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="serve wss:// with this certificate chain (and its key, unless --tls-key)",
    )
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="the --tls-cert key")
    args = parser.parse_args(args_in)
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    tls: ssl.SSLContext | None = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        except OSError as exc:  # ssl.SSLError included
            parser.error(f"cannot load --tls-cert/--tls-key: {exc}")
    secret, source = _secret_from(args.secret)
    api_key, api_key_source = _api_key_from(args.api_key)
    sim = Simulator(
        secret,
        host=args.host,
        port=args.port,
        rates=dict(args.rate),
        default_rate=args.default_rate,
        record=args.record,
        ignore_expiration=not args.check_expiration,
        seed=args.seed,
        frame_size=args.frame_size,
        instances=args.instance,
        ssl_context=tls,
        api_key=api_key,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            sim.start()
        except OSError as exc:
            sys.stderr.write(f"forwarder simulate: cannot listen: {exc}\n")
            return 1
        hint = {"--secret": " --secret <your secret>", "FORWARDER_SIM_SECRET": ""}.get(source, "")
        http = "https" if tls else "http"
        sys.stdout.write(
            f"simulator listening on {sim.url}?event=EVENT&token=TOKEN\n"
            f"stats: {http}://{args.host}:{sim.port}/stats  "
            f"control: POST {http}://{args.host}:{sim.port}/control/<name>\n"
            f"instances: GET {http}://{args.host}:{sim.port}/instance/fetchInstances "
            f"(header apikey, from {api_key_source})\n"
            f"mint a token: forwarder simulate token --instance NAME{hint}\n"
            f"(secret from {source})\n"
        )
        sys.stdout.flush()
        while not stop.wait(1.0):
            if args.stats_file:
                _write_stats(args.stats_file, sim.stats())
        if args.stats_file:
            _write_stats(args.stats_file, sim.stats())
        return 0
    finally:
        sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
