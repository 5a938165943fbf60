"""Configuration: a TOML file, environment overrides, validated once into frozen objects.

`load_config()` is the only code that reads the configuration file and ``os.environ``; the
result is passed down to everything else. Every error is a `ConfigError` whose message names
the offending key and the reason, and never contains a secret.
"""

from __future__ import annotations

import math
import os
import re
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import urlsplit

from forwarder.addresses import (
    UPSTREAM_PATH,
    check_redis_url,
    check_ws_url,
    is_loopback,
    split_listen,
)
from forwarder.errors import ConfigError, TLSFileError, UnreadableFile
from forwarder.events import ALLOWED_EVENTS, REFUSED_EVENTS, SENT_EVENTS, SILENT_EVENTS
from forwarder.files import read_regular_file
from forwarder.logs import redact
from forwarder.tls import client_context
from forwarder.tokens import is_jwt

if TYPE_CHECKING:
    from forwarder.discovery_config import DiscoveryConfig
from forwarder.fleet.config import NAME_RE as FLEET_NAME_RE
from forwarder.fleet.config import FleetConfig

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9108"
DEFAULT_STREAM = "{event}"
DEFAULT_DEAD_LETTER = "{stream}:dlq"
DEFAULT_GAP_STREAM = "forwarder:gaps"
ENV_SOURCE_NAME = "default"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONFIG_FILE_LIMIT = 16 * 1024 * 1024  # bytes
TOKEN_FILE_LIMIT = 64 * 1024  # bytes; a JWT is a few hundred


class Secret:
    """A string that never shows itself in repr(), str(), logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret; only for building the one request that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class TokenCell:
    """The current token of a discovered instance, replaced when a listing shows a new one.

    Thread-safe: `set` and `get` swap and read one reference. Compares by identity, so a
    subscription whose token changed is still the same subscription (no reconnect): the new
    token is read at its next connection attempt.
    """

    __slots__ = ("_token",)

    def __init__(self, token: Secret) -> None:
        self._token = token

    def get(self) -> Secret:
        return self._token

    def set(self, token: Secret) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "TokenCell('***')"


@dataclass(frozen=True)
class TokenRef:
    """Where a source's token comes from.

    A file is read again before every connection attempt, so a rotated token (or a systemd
    credential) is picked up without a restart; an environment value is captured at load; a
    discovered instance's token lives in a `TokenCell` that each poll may update.
    """

    file: Path | None = None
    value: Secret | None = None
    origin: str = ""  # for messages: "token_file /etc/…" or "token_env X"; never the value
    cell: TokenCell | None = None

    def read(self) -> Secret:
        """Return the current token; raises ConfigError (without the token) when unusable."""
        if self.cell is not None:
            return self.cell.get()
        if self.value is not None:
            return self.value
        assert self.file is not None
        try:
            text = read_regular_file(self.file, TOKEN_FILE_LIMIT).decode("utf-8").strip()
        except (UnreadableFile, UnicodeDecodeError) as exc:
            reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
            raise ConfigError(f"{self.origin}: cannot read token file: {reason}") from None
        return _check_token(text, self.origin)


def _check_token(text: str, origin: str) -> Secret:
    if not text:
        raise ConfigError(f"{origin}: the token is empty")
    if not is_jwt(text):
        raise ConfigError(
            f"{origin}: the token is not a JWT (three base64url parts separated by dots); "
            "the upstream rejects anything else with HTTP 401"
        )
    return Secret(text)


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays in seconds: capped exponential growth with jitter (see backoff.py)."""

    initial: float = 0.5
    maximum: float = 30.0
    auth_initial: float = 5.0
    auth_maximum: float = 300.0
    stable_after: float = 30.0  # a connection that lived this long resets the backoff


@dataclass(frozen=True)
class SourceConfig:
    """One upstream instance (one token) and the events to subscribe to."""

    name: str
    url: str
    token: TokenRef
    events: tuple[str, ...] = SENT_EVENTS
    stream: str = DEFAULT_STREAM
    connect_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 10.0
    read_timeout: float = 30.0  # a frame started but not finished for this long: dead peer
    max_frame_bytes: int = 16 * 1024 * 1024
    backoff: Backoff = field(default_factory=Backoff)
    # Displacement (a newer connection with the same token silently takes the feed): no data
    # frame for this long triggers a make-before-break re-subscribe; 0 turns the watchdog off.
    silence_timeout: float = 300.0
    resubscribe_interval: float = 0.0  # periodic make-before-break re-subscribe; 0 = off
    # Flapping: this many confirmed displacements within flap_window seconds mean another
    # client keeps taking the feed; the watchdog then stands down for flap_backoff (doubling).
    flap_threshold: int = 3
    flap_window: float = 3600.0
    flap_backoff: float = 3600.0
    token_expiry_warning: float = 900.0  # WARN this long before the token's exp; 0 = never
    # TLS, wss:// only. ca_file None: the system trust store. client_key None with a
    # client_cert: the key is in the certificate file.
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def stream_for(self, event: str) -> str:
        return self.stream.format(source=self.name, event=event)


@dataclass(frozen=True)
class RedisConfig:
    url: str = field(default=DEFAULT_REDIS_URL, repr=False)  # may hold a password
    maxlen: int | None = None
    dead_letter_stream: str = DEFAULT_DEAD_LETTER
    gap_stream: str = DEFAULT_GAP_STREAM  # one stream for the blind intervals of all subscriptions
    socket_timeout: float = 5.0
    batch_max: int = 1000
    # "maxlen": XADD trims each stream to `maxlen` (~) whatever its consumer groups have read.
    # "acked": retention.py trims only what every group acknowledged; maxlen is the ceiling.
    retention: str = "maxlen"
    # TLS, rediss:// only (verification is always on): as in SourceConfig.
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    # Redis Cluster with a redis:// or rediss:// URL naming one node (redis+cluster:// too).
    cluster: bool = False
    # After each batch, WAIT for this many replicas to have it before the spool lets it go
    # (0: do not wait); a shortfall after wait_timeout seconds keeps it spooled and retries.
    wait_replicas: int = 0
    wait_timeout: float = 1.0


# Seconds a connected subscription may go without a frame before it counts as "stalled"
# (metrics, /status, alerts); 0 = never. How quiet an event may be depends on the event: a
# busy number gets messages.upsert every minute, while qrcode.updated only fires while
# pairing and call.upsert when someone calls. `[metrics.stall_after]` overrides these.
DEFAULT_STALL_AFTER: dict[str, float] = {
    "default": 3600.0,
    "messages.upsert": 900.0,
    **dict.fromkeys(
        (
            "qrcode.updated",
            "call.upsert",
            "connection.update",
            "groups.upsert",
            "groups.update",
            "group-participants.update",
            *SILENT_EVENTS,
        ),
        0.0,
    ),
}
METRICS_DETAILS = ("event", "subscription")
SOURCE_LABELS = ("auto", "always", "never")


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = DEFAULT_METRICS_LISTEN
    # /readyz policy: Redis answered recently and at least this fraction of subscriptions is
    # connected (1.0 = all of them).
    ready_min_connected: float = 1.0
    # "event": series per event (and source, see source_label), bounded at fleet scale;
    # "subscription": every series per (source, event), for small deployments.
    detail: str = "event"
    # With detail "event": label counters by source too? "auto": when there are at most
    # metrics.AUTO_SOURCE_LABEL_MAX sources at start.
    source_label: str = "auto"
    # (event or "default", seconds), sorted: see DEFAULT_STALL_AFTER.
    stall_after: tuple[tuple[str, float], ...] = tuple(sorted(DEFAULT_STALL_AFTER.items()))

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


RETENTION_MODES = ("maxlen", "acked")


@dataclass(frozen=True)
class ConsumersConfig:
    """The consumer-group monitor (consumers.py): stream and group metrics, retention "acked"."""

    interval: float = 10.0  # seconds for one round over every stream; 0 = off
    # At most this many streams visited per second (0: no bound): with a stream per
    # subscription at fleet scale, rounds then last longer than `interval` instead of
    # costing the process more CPU the more streams there are.
    streams_per_second: float = 250.0


@dataclass(frozen=True)
class SpoolConfig:
    """The on-disk spool every received frame goes through (see spool.py)."""

    dir: Path = Path("spool")
    # At this size on disk, new frames are refused: counted in
    # forwarder_messages_dropped_total and logged at ERROR. The policy is "keep the oldest":
    # what is already spooled is never deleted before Redis confirms it.
    max_bytes: int = 1024 * 1024 * 1024
    fsync_interval: float = 0.2  # a machine crash loses at most this much; a process crash 0
    memory_bytes: int = 64 * 1024 * 1024  # recent frames also kept in memory for the writer


@dataclass(frozen=True)
class IOConfig:
    """How the subscriptions are run: I/O loops, the handshake pool and its rate limit."""

    # Selector threads. 1 by default: they share one interpreter lock, and a second one costs
    # more in lock hand-offs than it gains (idle CPU at 10,010 subscriptions: 3.7 % with one
    # loop, 5.2 % with two). 0: one per CPU core, at most 4.
    loops: int = 1
    handshake_threads: int = 32  # concurrent handshakes (a slow upstream holds one each)
    # Connection attempts per second across all subscriptions, with a burst: the upstream sees
    # at most connect_burst + connect_rate attempts in any second (450 by default: below the
    # upstream-friendly 500), and 10,010 subscriptions connect in about 24 s.
    connect_rate: float = 425.0
    connect_burst: int = 25


@dataclass(frozen=True)
class Subscription:
    """One (source, event) pair and the stream its frames go to."""

    source: SourceConfig
    event: str
    stream: str
    dead_letter_stream: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.source.name, self.event)


@dataclass(frozen=True)
class Config:
    sources: tuple[SourceConfig, ...]
    redis: RedisConfig = field(default_factory=RedisConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    consumers: ConsumersConfig = field(default_factory=ConsumersConfig)
    io: IOConfig = field(default_factory=IOConfig)
    shutdown_timeout: float = 10.0
    log_level: str = "INFO"
    path: Path | None = None
    discovery: tuple[DiscoveryConfig, ...] = ()
    fleet: FleetConfig = field(default_factory=FleetConfig)

    def subscriptions(self) -> list[Subscription]:
        subs = []
        for source in self.sources:
            for event in source.events:
                stream = source.stream_for(event)
                dlq = self.redis.dead_letter_stream.format(
                    stream=stream, source=source.name, event=event
                )
                subs.append(Subscription(source, event, stream, dlq))
        return subs

    def warnings(self) -> list[str]:
        """Settings that are allowed but rarely meant: `run` logs each at WARNING and
        `check-config` prints them."""
        notes = []
        if not is_loopback(self.metrics.host):
            notes.append(
                f"the metrics endpoint listens on {self.metrics.listen!r}: /metrics, /status, "
                "/healthz and /readyz are then reachable from the network, without "
                "authentication (they show sources, streams and error texts, never tokens); "
                "bind 127.0.0.1 unless a scraper elsewhere needs it, and firewall the port"
            )
        for source in self.sources:
            path = urlsplit(source.url).path
            if path != UPSTREAM_PATH:
                notes.append(
                    f"source {source.name!r}: the URL's path is {path!r}, but the upstream "
                    f"serves the feed only at {UPSTREAM_PATH} and answers any other path with "
                    "HTTP 401 (ignore this if a reverse proxy maps the path)"
                )
        return notes

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, with every secret replaced by ***."""
        return {
            "config_file": str(self.path) if self.path else None,
            "log_level": self.log_level,
            "shutdown_timeout": self.shutdown_timeout,
            "redis": {
                "url": redact_url(self.redis.url),
                "maxlen": self.redis.maxlen,
                "dead_letter_stream": self.redis.dead_letter_stream,
                "gap_stream": self.redis.gap_stream,
                "socket_timeout": self.redis.socket_timeout,
                "batch_max": self.redis.batch_max,
                "retention": self.redis.retention,
                "cluster": self.redis.cluster,
                "wait_replicas": self.redis.wait_replicas,
                "wait_timeout": self.redis.wait_timeout,
                **_tls_paths(self.redis.ca_file, self.redis.client_cert, self.redis.client_key),
            },
            "metrics": {
                "listen": self.metrics.listen,
                "ready_min_connected": self.metrics.ready_min_connected,
                "detail": self.metrics.detail,
                "source_label": self.metrics.source_label,
                "stall_after": dict(self.metrics.stall_after),
            },
            "consumers": {"interval": self.consumers.interval},
            "spool": {
                "dir": str(self.spool.dir),
                "max_bytes": self.spool.max_bytes,
                "fsync_interval": self.spool.fsync_interval,
                "memory_bytes": self.spool.memory_bytes,
            },
            "io": {f.name: getattr(self.io, f.name) for f in fields(self.io)},
            "sources": [
                {
                    "name": s.name,
                    "url": redact_url(s.url),
                    "token": f"*** ({s.token.origin})",
                    "events": list(s.events),
                    "stream": s.stream,
                    "connect_timeout": s.connect_timeout,
                    "ping_interval": s.ping_interval,
                    "ping_timeout": s.ping_timeout,
                    "read_timeout": s.read_timeout,
                    "max_frame_bytes": s.max_frame_bytes,
                    "backoff": {f.name: getattr(s.backoff, f.name) for f in fields(s.backoff)},
                    "silence_timeout": s.silence_timeout,
                    "resubscribe_interval": s.resubscribe_interval,
                    "flap_threshold": s.flap_threshold,
                    "flap_window": s.flap_window,
                    "flap_backoff": s.flap_backoff,
                    "token_expiry_warning": s.token_expiry_warning,
                    **_tls_paths(s.ca_file, s.client_cert, s.client_key),
                }
                for s in self.sources
            ],
            "discovery": [d.redacted() for d in self.discovery],
            "subscriptions": [
                {"source": sub.source.name, "event": sub.event, "stream": sub.stream}
                for sub in self.subscriptions()
            ],
            "fleet": {f.name: getattr(self.fleet, f.name) for f in fields(self.fleet)},
        }


def _tls_paths(
    ca_file: Path | None, client_cert: Path | None, client_key: Path | None
) -> dict[str, str | None]:
    """TLS file paths for `redacted()`: paths are not secrets (the files' contents are)."""
    return {
        "ca_file": str(ca_file) if ca_file else None,
        "client_cert": str(client_cert) if client_cert else None,
        "client_key": str(client_key) if client_key else None,
    }


def redact_url(url: str) -> str:
    """Hide a `token=` query value, a JWT and a URL password (redis://user:pass@host).

    The one set of redaction rules is `logs.redact`; this name is what messages about URLs use.
    """
    return redact(url)


# ---------------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Config:
    """Build the validated configuration from an optional TOML file and the environment.

    ``path`` (the --config flag) wins over ``FORWARDER_CONFIG``. Environment variables
    override the file's `redis.url` and `metrics.listen`; ``FORWARDER_URL`` defines a single
    source named `default` when the file defines none.
    """
    chosen = path if path is not None else environ.get("FORWARDER_CONFIG") or None
    data: dict[str, Any] = {}
    file_path: Path | None = None
    if chosen is not None:
        file_path = Path(chosen)
        origin = str(file_path) if path is not None else f"FORWARDER_CONFIG {file_path}"
        try:
            raw = read_regular_file(file_path, CONFIG_FILE_LIMIT)
        except UnreadableFile as exc:
            raise ConfigError(f"{origin}: cannot read configuration: {exc}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{file_path}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file_path}: invalid TOML: {exc}") from None

    where = str(file_path) if file_path else "environment"
    reader = _Table(data, where, "")
    redis_cfg = _parse_redis(reader.table("redis"))
    metrics_cfg = _parse_metrics(reader.table("metrics"))
    spool_cfg = _parse_spool(reader.table("spool"), environ)
    consumers_cfg = _parse_consumers(reader.table("consumers"), redis_cfg)
    io_cfg = _parse_io(reader.table("io"))
    sources = [_parse_source(t, environ) for t in reader.tables("sources")]
    from forwarder.discovery_config import parse_discovery  # it imports this module

    discovery = [parse_discovery(t, environ) for t in reader.tables("discovery")]
    fleet_cfg = _parse_fleet(reader.table("fleet"))
    shutdown_timeout = reader.number("shutdown_timeout", 10.0, minimum=0.1)
    log_level = reader.string("log_level", "INFO").upper()
    reader.finish()

    # Each value is checked under the name of whatever supplied it: the file's key or the
    # environment variable that overrides it.
    redis_where, listen_where, level_where = "redis.url", "metrics.listen", "log_level"
    if "FORWARDER_REDIS_URL" in environ:
        redis_cfg = replace(redis_cfg, url=environ["FORWARDER_REDIS_URL"])
        redis_where = "FORWARDER_REDIS_URL"
    if "FORWARDER_METRICS_LISTEN" in environ:
        metrics_cfg = replace(metrics_cfg, listen=environ["FORWARDER_METRICS_LISTEN"])
        listen_where = "FORWARDER_METRICS_LISTEN"
    if "FORWARDER_LOG_LEVEL" in environ:
        log_level = environ["FORWARDER_LOG_LEVEL"].upper()
        level_where = "FORWARDER_LOG_LEVEL"
    if environ.get("FORWARDER_FLEET_NAME"):  # e.g. Environment=FORWARDER_FLEET_NAME=%H
        name = environ["FORWARDER_FLEET_NAME"]
        if not FLEET_NAME_RE.match(name):
            raise ConfigError(
                f"FORWARDER_FLEET_NAME: {name!r} must be 1-64 characters of letters, digits, "
                "'_', '.', '-'"
            )
        fleet_cfg = replace(fleet_cfg, name=name)
    if environ.get("FORWARDER_URL"):
        if sources:
            raise ConfigError(
                "FORWARDER_URL is set but the configuration file defines [[sources]]: "
                "use one or the other"
            )
        sources.append(_env_source(environ))
    elif ("FORWARDER_TOKEN" in environ or "FORWARDER_EVENTS" in environ) and not sources:
        raise ConfigError("FORWARDER_TOKEN/FORWARDER_EVENTS are set but FORWARDER_URL is not")

    if not sources and not discovery:
        raise ConfigError(
            "no sources configured: pass --config FILE (or FORWARDER_CONFIG) with [[sources]] "
            "or [[discovery]], or set FORWARDER_URL, FORWARDER_TOKEN and optionally "
            "FORWARDER_EVENTS"
        )
    if urlsplit(redis_cfg.url).scheme in MULTI_HOST_SCHEMES:
        _check_multi_host_url(redis_cfg.url, redis_cfg)
    else:
        check_redis_url(redis_cfg.url, redis_where)
        _check_redis_tls(redis_cfg)
    if redis_cfg.cluster and urlsplit(redis_cfg.url).scheme not in {
        "redis",
        "rediss",
        "redis+cluster",
    }:
        raise ConfigError("redis.cluster: needs a redis:// or rediss:// URL naming a node")
    clustered = redis_cfg.cluster or urlsplit(redis_cfg.url).scheme == "redis+cluster"
    if clustered and redis_cfg.retention == "acked":
        raise ConfigError(
            'redis.retention: "acked" is not supported with Redis Cluster yet (its trimming '
            'reads every group of a stream in one call); use "maxlen"'
        )
    if redis_cfg.wait_replicas and redis_cfg.wait_timeout >= redis_cfg.socket_timeout:
        raise ConfigError(
            "redis.wait_timeout: must be below redis.socket_timeout (WAIT's reply would "
            "otherwise time out on the socket first)"
        )
    split_listen(metrics_cfg.listen, listen_where)
    if log_level not in LOG_LEVELS:
        raise ConfigError(
            f"{level_where}: expected DEBUG, INFO, WARNING or ERROR, got {log_level!r}"
        )

    config = Config(
        sources=tuple(sources),
        redis=redis_cfg,
        metrics=metrics_cfg,
        spool=spool_cfg,
        consumers=consumers_cfg,
        io=io_cfg,
        shutdown_timeout=shutdown_timeout,
        log_level=log_level,
        path=file_path,
        discovery=tuple(discovery),
        fleet=fleet_cfg,
    )
    _check_unique(config)
    return config


def _parse_redis(t: _Table) -> RedisConfig:
    maxlen = t.integer("maxlen", None, minimum=1)
    dlq = t.string("dead_letter_stream", DEFAULT_DEAD_LETTER)
    _check_template(dlq, {"stream", "source", "event"}, t.key("dead_letter_stream"))
    cfg = RedisConfig(
        url=t.string("url", DEFAULT_REDIS_URL),
        maxlen=maxlen,
        dead_letter_stream=dlq,
        gap_stream=t.string("gap_stream", DEFAULT_GAP_STREAM),
        socket_timeout=t.number("socket_timeout", 5.0, minimum=0.1),
        batch_max=t.integer("batch_max", 1000, minimum=1) or 1000,
        retention=_parse_retention(t),
        **_parse_tls(t),
        cluster=t.boolean("cluster", False),
        wait_replicas=t.integer("wait_replicas", 0, minimum=0) or 0,
        wait_timeout=t.number("wait_timeout", 1.0, minimum=0.01),
    )
    t.finish()
    return cfg


def _parse_retention(t: _Table) -> str:
    mode = t.string("retention", "maxlen")
    if mode not in RETENTION_MODES:
        raise ConfigError(
            f'{t.key("retention")}: expected "maxlen" (trim by length, today\'s behaviour) or '
            f'"acked" (trim only what every consumer group acknowledged), got {mode!r}'
        )
    return mode


def _parse_consumers(t: _Table, redis_cfg: RedisConfig) -> ConsumersConfig:
    interval = t.number("interval", ConsumersConfig.interval, minimum=0.0)
    rate = t.number("streams_per_second", ConsumersConfig.streams_per_second, minimum=0.0)
    t.finish()
    if 0 < interval < 0.1:
        raise ConfigError(f"{t.key('interval')}: at least 0.1 seconds (0 turns the monitor off)")
    if interval == 0 and redis_cfg.retention == "acked":
        raise ConfigError(
            f"{t.key('interval')} = 0 turns off the monitor that trims streams under "
            'redis.retention = "acked": set an interval, or use retention = "maxlen"'
        )
    return ConsumersConfig(interval=interval, streams_per_second=rate)


def _parse_spool(t: _Table, environ: Mapping[str, str]) -> SpoolConfig:
    default = SpoolConfig()
    directory = environ.get("FORWARDER_SPOOL_DIR") or t.optional_string("dir")
    if directory and Path(directory).exists() and not Path(directory).is_dir():
        where = "FORWARDER_SPOOL_DIR" if environ.get("FORWARDER_SPOOL_DIR") else t.key("dir")
        raise ConfigError(f"{where}: {directory} exists and is not a directory")
    cfg = SpoolConfig(
        dir=Path(directory) if directory else default_spool_dir(environ),
        max_bytes=t.integer("max_bytes", default.max_bytes, minimum=1024 * 1024)
        or default.max_bytes,
        fsync_interval=t.number("fsync_interval", default.fsync_interval, minimum=0.001),
        memory_bytes=t.integer("memory_bytes", default.memory_bytes, minimum=1024 * 1024)
        or default.memory_bytes,
    )
    t.finish()
    return cfg


def _parse_io(t: _Table) -> IOConfig:
    default = IOConfig()
    loops = t.integer("loops", default.loops, minimum=0)
    threads = t.integer("handshake_threads", default.handshake_threads, minimum=1)
    cfg = IOConfig(
        loops=default.loops if loops is None else loops,
        handshake_threads=threads or default.handshake_threads,
        connect_rate=t.number("connect_rate", default.connect_rate, minimum=0.1),
        connect_burst=t.integer("connect_burst", default.connect_burst, minimum=1)
        or default.connect_burst,
    )
    for key, value, most in (
        ("loops", cfg.loops, 64),
        ("handshake_threads", cfg.handshake_threads, 1024),
    ):
        if value > most:
            raise ConfigError(f"{t.key(key)}: at most {most}")
    t.finish()
    return cfg


def default_spool_dir(environ: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY/spool (systemd StateDirectory=), else the XDG state directory."""
    state = environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "spool"
    xdg = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "forwarder" / "spool"


def _parse_fleet(t: _Table) -> FleetConfig:
    """[fleet]: several forwarder processes share the subscriptions (forwarder/fleet/)."""
    ttl = t.number("lease_ttl", FleetConfig.lease_ttl, minimum=1.0)
    name = t.optional_string("name")
    if name is not None and not FLEET_NAME_RE.match(name):
        raise ConfigError(
            f"{t.key('name')}: {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    group = t.string("group", FleetConfig.group)
    if not FLEET_NAME_RE.match(group):
        raise ConfigError(
            f"{t.key('group')}: {group!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    cfg = FleetConfig(
        enabled=t.boolean("enabled", False),
        name=name,
        group=group,
        lease_ttl=ttl,
        renew_interval=t.number("renew_interval", ttl / 3, minimum=0.05),
        margin=t.number("margin", ttl / 5, minimum=0.05),
        handover_timeout=t.number("handover_timeout", FleetConfig.handover_timeout, minimum=1.0),
        max_handovers=t.integer("max_handovers", FleetConfig.max_handovers, minimum=1)
        or FleetConfig.max_handovers,
    )
    problem = cfg.check()
    if problem is not None:
        raise ConfigError(problem)
    t.finish()
    return cfg


def _parse_metrics(t: _Table) -> MetricsConfig:
    ratio = t.number("ready_min_connected", 1.0, minimum=0.0)
    if ratio > 1.0:
        raise ConfigError(f"{t.key('ready_min_connected')}: a fraction between 0 and 1")
    detail = t.string("detail", "event")
    if detail not in METRICS_DETAILS:
        raise ConfigError(f"{t.key('detail')}: expected 'event' or 'subscription', got {detail!r}")
    source_label = t.string("source_label", "auto")
    if source_label not in SOURCE_LABELS:
        raise ConfigError(
            f"{t.key('source_label')}: expected 'auto', 'always' or 'never', got {source_label!r}"
        )
    stall = t.table("stall_after")
    stall_after = dict(DEFAULT_STALL_AFTER)
    for name in list(stall._data):
        if name != "default" and name not in ALLOWED_EVENTS:
            raise ConfigError(
                f"{stall.key(name)}: not an event name (nor 'default'): the keys are events "
                "whose stall threshold in seconds you set, 0 for never"
            )
        stall_after[name] = stall.number(name, 0.0, minimum=0.0)
    stall.finish()
    cfg = MetricsConfig(
        listen=t.string("listen", DEFAULT_METRICS_LISTEN),
        ready_min_connected=ratio,
        detail=detail,
        source_label=source_label,
        stall_after=tuple(sorted(stall_after.items())),
    )
    t.finish()
    return cfg


def _parse_source(t: _Table, environ: Mapping[str, str]) -> SourceConfig:
    name = t.string("name", None)
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"{t.key('name')}: {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    url = t.string("url", None)
    check_ws_url(url, t.key("url"))
    tls = _parse_tls(t)
    if urlsplit(url).scheme != "wss":
        for key, path in tls.items():
            if path is not None:
                raise ConfigError(
                    f"{t.key(key)}: TLS settings need a wss:// URL, but {t.key('url')} is "
                    f"{redact_url(url)!r} (ws:// is not encrypted): use wss:// or remove {key}"
                )
    token_file = t.optional_string("token_file")
    token_env = t.optional_string("token_env")
    if (token_file is None) == (token_env is None):
        raise ConfigError(f"{t.prefix}: set exactly one of token_file or token_env")
    if token_file is not None:
        token = TokenRef(file=Path(token_file), origin=f"{t.key('token_file')} {token_file}")
        token.read()  # fail at start, with a clear message, rather than at the first connect
    else:
        assert token_env is not None
        origin = f"{t.key('token_env')} {token_env}"
        if token_env not in environ:
            raise ConfigError(f"{origin}: the environment variable is not set")
        token = TokenRef(value=_check_token(environ[token_env].strip(), origin), origin=origin)
    events = _check_events(t.string_list("events", list(SENT_EVENTS)), t.key("events"))
    stream = t.string("stream", DEFAULT_STREAM)
    _check_template(stream, {"source", "event"}, t.key("stream"))
    defaults = Backoff()
    backoff_t = t.table("backoff")
    backoff = Backoff(
        **{
            f.name: backoff_t.number(f.name, getattr(defaults, f.name), minimum=0.0)
            for f in fields(Backoff)
        }
    )
    backoff_t.finish()
    if backoff.initial > backoff.maximum or backoff.auth_initial > backoff.auth_maximum:
        raise ConfigError(f"{t.prefix}.backoff: an initial delay is larger than its maximum")
    cfg = SourceConfig(
        name=name,
        url=url,
        token=token,
        events=events,
        stream=stream,
        connect_timeout=t.number("connect_timeout", 10.0, minimum=0.1),
        ping_interval=t.number("ping_interval", 20.0, minimum=0.1),
        ping_timeout=t.number("ping_timeout", 10.0, minimum=0.1),
        read_timeout=t.number("read_timeout", 30.0, minimum=0.1),
        max_frame_bytes=t.integer("max_frame_bytes", 16 * 1024 * 1024, minimum=1024) or 1,
        backoff=backoff,
        silence_timeout=t.number("silence_timeout", 300.0, minimum=0.0),
        resubscribe_interval=t.number("resubscribe_interval", 0.0, minimum=0.0),
        flap_threshold=t.integer("flap_threshold", 3, minimum=1) or 3,
        flap_window=t.number("flap_window", 3600.0, minimum=0.1),
        flap_backoff=t.number("flap_backoff", 3600.0, minimum=0.1),
        token_expiry_warning=t.number("token_expiry_warning", 900.0, minimum=0.0),
        **tls,
    )
    t.finish()
    return cfg


def _env_source(environ: Mapping[str, str]) -> SourceConfig:
    url = environ["FORWARDER_URL"]
    check_ws_url(url, "FORWARDER_URL")
    if "FORWARDER_TOKEN" not in environ:
        raise ConfigError("FORWARDER_URL is set but FORWARDER_TOKEN is not")
    token = TokenRef(
        value=_check_token(environ["FORWARDER_TOKEN"].strip(), "FORWARDER_TOKEN"),
        origin="FORWARDER_TOKEN",
    )
    raw_events = environ.get("FORWARDER_EVENTS", "")
    names = [e.strip() for e in raw_events.split(",") if e.strip()] or list(SENT_EVENTS)
    return SourceConfig(
        name=ENV_SOURCE_NAME,
        url=url,
        token=token,
        events=_check_events(names, "FORWARDER_EVENTS"),
    )


def _check_events(names: list[str], where: str) -> tuple[str, ...]:
    if not names:
        raise ConfigError(f"{where}: the list is empty (omit it to subscribe to the defaults)")
    seen: set[str] = set()
    for name in names:
        if name in REFUSED_EVENTS:
            raise ConfigError(f"{where}: {REFUSED_EVENTS[name]}")
        if name not in ALLOWED_EVENTS:
            raise ConfigError(
                f"{where}: unknown event {name!r}; the upstream answers it with HTTP 401. "
                f"Known events: {', '.join(sorted(ALLOWED_EVENTS))}"
            )
        if name in seen:
            raise ConfigError(f"{where}: event {name!r} is listed twice")
        seen.add(name)
    return tuple(names)


def _check_template(template: str, allowed: set[str], where: str) -> None:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{where}: invalid template {template!r}: {exc}") from None
    for _, name, spec, conv in parts:
        if name is None:
            continue
        if name not in allowed or spec or conv:
            names = ", ".join("{" + a + "}" for a in sorted(allowed))
            raise ConfigError(f"{where}: unknown placeholder {{{name}}}; allowed: {names}")
    if not template:
        raise ConfigError(f"{where}: empty")


MULTI_HOST_SCHEMES = ("redis+sentinel", "redis+cluster")


def redis_hosts(url: str) -> list[tuple[str, int]]:
    """The host:port list of a redis+sentinel:// or redis+cluster:// URL (comma-separated,
    after the optional user:password@); redis:// and rediss:// give their one host."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    default = 26379 if parts.scheme == "redis+sentinel" else 6379
    hosts = []
    for item in netloc.split(","):
        host, colon, port = item.strip().rpartition(":") if ":" in item else (item, "", "")
        host = host.strip("[]")
        if not host or (colon and not port.isdigit()):
            raise ConfigError(f"redis.url: expected host:port, got {item.strip()!r}")
        number = int(port) if colon else default
        if not 0 < number <= 65535:
            raise ConfigError(f"redis.url: port {number} is out of range")
        hosts.append((host, number))
    return hosts


def _check_multi_host_url(url: str, cfg: RedisConfig) -> None:
    parts = urlsplit(url)
    redis_hosts(url)
    path = [p for p in parts.path.split("/") if p]
    if parts.scheme == "redis+sentinel" and not 1 <= len(path) <= 2:
        raise ConfigError(
            "redis.url: expected redis+sentinel://[user:password@]host:port[,host:port...]"
            f"/SERVICE[/DB], got {redact_url(url)!r}"
        )
    if len(path) == 2 and not path[1].isdigit():
        raise ConfigError(f"redis.url: the database must be a number, got {path[1]!r}")
    if parts.scheme == "redis+cluster" and path not in ([], ["0"]):
        raise ConfigError("redis.url: Redis Cluster has one database: put no path in the URL")
    if parts.query or parts.fragment:
        raise ConfigError("redis.url: no ?query or #fragment in a redis+sentinel/cluster URL")
    if cfg.ca_file or cfg.client_cert or cfg.client_key:
        raise ConfigError(
            f"redis.url: TLS is not supported with {parts.scheme}:// (use cluster = true "
            "with a rediss:// URL for a TLS cluster)"
        )


def _check_redis_tls(cfg: RedisConfig) -> None:
    if urlsplit(cfg.url).scheme == "rediss":
        return
    for key in ("ca_file", "client_cert", "client_key"):
        if getattr(cfg, key) is not None:
            raise ConfigError(
                f"redis.{key}: TLS settings need a rediss:// URL, but redis.url is "
                f"{redact_url(cfg.url)!r}: use rediss:// or remove redis.{key}"
            )


class _TLSFiles(TypedDict):
    ca_file: Path | None
    client_cert: Path | None
    client_key: Path | None


def _parse_tls(t: _Table) -> _TLSFiles:
    """`ca_file`, `client_cert`, `client_key` of a table, checked readable and loadable now
    (by building the context a connection would use), so a bad file is a ConfigError naming
    the key rather than a failure at the first connect."""
    ca_file = _tls_path(t, "ca_file")
    cert = _tls_path(t, "client_cert")
    key = _tls_path(t, "client_key")
    if key is not None and cert is None:
        raise ConfigError(f"{t.key('client_key')}: set client_cert too (the key's certificate)")
    if ca_file is not None or cert is not None:
        try:
            client_context(ca_file, cert, key)
        except TLSFileError as exc:
            raise ConfigError(f"{t.key(exc.setting)}: {exc}") from None
    return _TLSFiles(ca_file=ca_file, client_cert=cert, client_key=key)


def _tls_path(t: _Table, key: str) -> Path | None:
    value = t.optional_string(key)
    if value is None:
        return None
    if not value:
        raise ConfigError(f"{t.key(key)}: an empty path")
    return Path(value)


def _check_unique(config: Config) -> None:
    names = [s.name for s in config.sources]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"sources: the name {name!r} is used twice")
    tables = [d.name for d in config.discovery]
    for name in tables:
        if tables.count(name) > 1:
            raise ConfigError(
                f"discovery: the name {name!r} is used twice: give each [[discovery]] a name"
            )
    problem = stream_role_conflict(config.subscriptions(), config.redis.gap_stream)
    if problem is not None:
        raise ConfigError(problem)


def stream_role_conflict(subscriptions: list[Subscription], gap_stream: str) -> str | None:
    """Why these subscriptions' stream keys cannot coexist, or None (see `StreamRoles`)."""
    return StreamRoles(gap_stream).conflict(subscriptions)


class StreamRoles:
    """The role (data, dead-letter, gap) of every stream key in use.

    Fan-in is allowed: several subscriptions may share a data stream (entries carry `source`
    and `event`), and their dead-letter streams may coincide too. What is refused is one key
    in two roles: data and dead letters (or gaps) mixed in one stream would break every
    consumer's parsing.
    """

    def __init__(self, gap_stream: str) -> None:
        self._roles: dict[str, tuple[str, str]] = {
            gap_stream: ("gap", "the gap stream (redis.gap_stream)")
        }

    def conflict(self, subscriptions: list[Subscription]) -> str | None:
        """Why these (new) subscriptions cannot join the keys in use, or None; changes nothing."""
        added: dict[str, tuple[str, str]] = {}
        for sub in subscriptions:
            for key, role in ((sub.stream, "data"), (sub.dead_letter_stream, "dead-letter")):
                label = f"{role} stream of source {sub.source.name!r} event {sub.event!r}"
                seen = added.get(key) or self._roles.get(key)
                if seen is None:
                    added[key] = (role, label)
                elif seen[0] != role:
                    return (
                        f"stream key {key!r} is the {label} and also the {seen[1]}: a stream "
                        "holds one kind of entry; change the stream template or "
                        "redis.dead_letter_stream"
                    )
        return None

    def add(self, subscriptions: list[Subscription]) -> None:
        """Record these subscriptions' keys (after `conflict` said None)."""
        for sub in subscriptions:
            for key, role in ((sub.stream, "data"), (sub.dead_letter_stream, "dead-letter")):
                self._roles.setdefault(
                    key, (role, f"{role} stream of source {sub.source.name!r} event {sub.event!r}")
                )


class _Table:
    """Typed access to one TOML table that remembers which keys were read.

    `finish()` rejects any key nobody asked for, so a typo is an error, not a silent default.
    """

    def __init__(self, data: dict[str, Any], where: str, prefix: str) -> None:
        self._data = data
        self._where = where
        self.prefix = prefix
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def _get(self, name: str) -> Any:
        self._used.add(name)
        return self._data.get(name)

    def table(self, name: str) -> _Table:
        value = self._get(name)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self._where}: {self.key(name)} must be a table")
        return _Table(value, self._where, self.key(name))

    def tables(self, name: str) -> list[_Table]:
        value = self._get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{self._where}: {self.key(name)} must be an array of tables")
        return [_Table(v, self._where, f"{self.key(name)}[{i}]") for i, v in enumerate(value)]

    def string(self, name: str, default: str | None) -> str:
        value = self._get(name)
        if value is None:
            if default is None:
                raise ConfigError(f"{self._where}: {self.key(name)} is required")
            return default
        if not isinstance(value, str):
            raise ConfigError(f"{self._where}: {self.key(name)} must be a string")
        return value

    def optional_string(self, name: str) -> str | None:
        value = self._get(name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self._where}: {self.key(name)} must be a string")
        return value

    def string_list(self, name: str, default: list[str]) -> list[str]:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self._where}: {self.key(name)} must be a list of strings")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self._where}: {self.key(name)} must be true or false")
        return value

    def number(self, name: str, default: float, minimum: float) -> float:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ConfigError(f"{self._where}: {self.key(name)} must be a number")
        if value < minimum or math.isinf(value):
            raise ConfigError(f"{self._where}: {self.key(name)} must be at least {minimum}")
        return float(value)

    def integer(self, name: str, default: int | None, minimum: int) -> int | None:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._where}: {self.key(name)} must be an integer")
        if value < minimum:
            raise ConfigError(f"{self._where}: {self.key(name)} must be at least {minimum}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ConfigError(f"{self._where}: unknown key {self.key(unknown[0])!r}")
