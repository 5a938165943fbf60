"""Configuration: a TOML file, environment overrides, validated once into frozen objects.

`load_config()` is the only code that reads the configuration file and ``os.environ``; the
result is passed down to everything else. Every error is a `ConfigError` whose message names
the offending key and the reason, and never contains a secret.
"""

from __future__ import annotations

import math
import os
import re
import ssl
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import parse_qsl, urlsplit

from forwarder.errors import ConfigError
from forwarder.events import ALLOWED_EVENTS, REFUSED_EVENTS, SENT_EVENTS

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9108"
DEFAULT_STREAM = "{event}"
DEFAULT_DEAD_LETTER = "{stream}:dlq"
DEFAULT_GAP_STREAM = "forwarder:gaps"
ENV_SOURCE_NAME = "default"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_JWT_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


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


@dataclass(frozen=True)
class TokenRef:
    """Where a source's token comes from.

    A file is read again before every connection attempt, so a rotated token (or a systemd
    credential) is picked up without a restart; an environment value is captured at load.
    """

    file: Path | None = None
    value: Secret | None = None
    origin: str = ""  # for messages: "token_file /etc/…" or "token_env X"; never the value

    def read(self) -> Secret:
        """Return the current token; raises ConfigError (without the token) when unusable."""
        if self.value is not None:
            return self.value
        assert self.file is not None
        try:
            text = self.file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{self.origin}: cannot read token file: {reason}") from None
        return _check_token(text, self.origin)


def _check_token(text: str, origin: str) -> Secret:
    if not text:
        raise ConfigError(f"{origin}: the token is empty")
    if not _JWT_RE.match(text):
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
    # TLS, rediss:// only (verification is always on): as in SourceConfig.
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = DEFAULT_METRICS_LISTEN
    # /readyz policy: Redis answered recently and at least this fraction of subscriptions is
    # connected (1.0 = all of them).
    ready_min_connected: float = 1.0

    @property
    def host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]


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
    io: IOConfig = field(default_factory=IOConfig)
    shutdown_timeout: float = 10.0
    log_level: str = "INFO"
    path: Path | None = None

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
                **_tls_paths(self.redis.ca_file, self.redis.client_cert, self.redis.client_key),
            },
            "metrics": {
                "listen": self.metrics.listen,
                "ready_min_connected": self.metrics.ready_min_connected,
            },
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
            "subscriptions": [
                {"source": sub.source.name, "event": sub.event, "stream": sub.stream}
                for sub in self.subscriptions()
            ],
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


_TOKEN_QUERY_RE = re.compile(r"(?i)(token=)[^&\s\"']+")
_URL_PASSWORD_RE = re.compile(r"(://[^:/@\s]*:)[^@/\s]+(@)")


def redact_url(url: str) -> str:
    """Hide a `token=` query value and a URL password (redis://user:pass@host)."""
    return _URL_PASSWORD_RE.sub(r"\1***\2", _TOKEN_QUERY_RE.sub(r"\1***", url))


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"metrics.listen: expected HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "127.0.0.1"
    number = int(port)
    if not 0 <= number <= 65535:
        raise ConfigError(f"metrics.listen: port {number} is out of range")
    return host, number


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
        try:
            raw = file_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{file_path}: cannot read configuration: {exc.strerror}") from None
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
    io_cfg = _parse_io(reader.table("io"))
    sources = [_parse_source(t, environ) for t in reader.tables("sources")]
    shutdown_timeout = reader.number("shutdown_timeout", 10.0, minimum=0.1)
    log_level = reader.string("log_level", "INFO").upper()
    reader.finish()

    if "FORWARDER_REDIS_URL" in environ:
        redis_cfg = replace(redis_cfg, url=environ["FORWARDER_REDIS_URL"])
    if "FORWARDER_METRICS_LISTEN" in environ:
        metrics_cfg = replace(metrics_cfg, listen=environ["FORWARDER_METRICS_LISTEN"])
    if "FORWARDER_LOG_LEVEL" in environ:
        log_level = environ["FORWARDER_LOG_LEVEL"].upper()
    if environ.get("FORWARDER_URL"):
        if sources:
            raise ConfigError(
                "FORWARDER_URL is set but the configuration file defines [[sources]]: "
                "use one or the other"
            )
        sources.append(_env_source(environ))
    elif ("FORWARDER_TOKEN" in environ or "FORWARDER_EVENTS" in environ) and not sources:
        raise ConfigError("FORWARDER_TOKEN/FORWARDER_EVENTS are set but FORWARDER_URL is not")

    if not sources:
        raise ConfigError(
            "no sources configured: pass --config FILE (or FORWARDER_CONFIG) with [[sources]], "
            "or set FORWARDER_URL, FORWARDER_TOKEN and optionally FORWARDER_EVENTS"
        )
    _check_redis_url(redis_cfg.url)
    _check_redis_tls(redis_cfg)
    metrics_cfg.port  # noqa: B018 - validates listen
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"log_level: expected DEBUG, INFO, WARNING or ERROR, got {log_level!r}")

    config = Config(
        sources=tuple(sources),
        redis=redis_cfg,
        metrics=metrics_cfg,
        spool=spool_cfg,
        io=io_cfg,
        shutdown_timeout=shutdown_timeout,
        log_level=log_level,
        path=file_path,
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
        **_parse_tls(t),
    )
    t.finish()
    return cfg


def _parse_spool(t: _Table, environ: Mapping[str, str]) -> SpoolConfig:
    default = SpoolConfig()
    directory = environ.get("FORWARDER_SPOOL_DIR") or t.optional_string("dir")
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


def _parse_metrics(t: _Table) -> MetricsConfig:
    ratio = t.number("ready_min_connected", 1.0, minimum=0.0)
    if ratio > 1.0:
        raise ConfigError(f"{t.key('ready_min_connected')}: a fraction between 0 and 1")
    cfg = MetricsConfig(
        listen=t.string("listen", DEFAULT_METRICS_LISTEN), ready_min_connected=ratio
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
    _check_ws_url(url, t.key("url"))
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
    _check_ws_url(url, "FORWARDER_URL")
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


def _check_ws_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in {"ws", "wss"} or not parts.hostname:
        raise ConfigError(f"{where}: expected a ws:// or wss:// URL, got {redact_url(url)!r}")
    if parts.query:
        raise ConfigError(
            f"{where}: put no query in the URL (event and token are added per subscription; "
            "a token in the URL would leak into logs)"
        )


def _check_redis_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError(
            f"redis.url: expected redis://, rediss:// or unix://, got {redact_url(url)!r}"
        )
    if any(name.lower().startswith("ssl") for name, _ in parse_qsl(parts.query)):
        # redis-py lets URL options override ours, e.g. ?ssl_cert_reqs=none.
        raise ConfigError(
            "redis.url: no ssl_* options in the URL: set redis.ca_file, redis.client_cert and "
            "redis.client_key; certificate and host name verification are always on"
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


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise _EncryptedKey


class _TLSFiles(TypedDict):
    ca_file: Path | None
    client_cert: Path | None
    client_key: Path | None


def _parse_tls(t: _Table) -> _TLSFiles:
    """`ca_file`, `client_cert`, `client_key` of a table, checked readable and loadable now,
    so a bad file is a ConfigError naming the key rather than a failure at the first connect."""
    ca_file = _readable_path(t, "ca_file")
    cert = _readable_path(t, "client_cert")
    key = _readable_path(t, "client_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{t.key('ca_file')}: {ca_file} holds no usable PEM CA certificate ({exc})"
            ) from None
    if key is not None and cert is None:
        raise ConfigError(f"{t.key('client_key')}: set client_cert too (the key's certificate)")
    if cert is not None:
        try:
            context.load_cert_chain(cert, key, password=_no_password)
        except _EncryptedKey:
            raise ConfigError(
                f"{t.key('client_key' if key else 'client_cert')}: the private key is "
                "encrypted; forwarder cannot ask for a passphrase: store it unencrypted, "
                "readable only by the service (e.g. as a systemd credential)"
            ) from None
        except ssl.SSLError as exc:
            hint = "" if key else "; if the key is in a separate file, set client_key"
            raise ConfigError(
                f"{t.key('client_cert')}: cannot load a PEM certificate and its private key "
                f"from {cert}{f' and {key}' if key else ''} ({exc}){hint}"
            ) from None
    return _TLSFiles(ca_file=ca_file, client_cert=cert, client_key=key)


def _readable_path(t: _Table, key: str) -> Path | None:
    value = t.optional_string(key)
    if value is None:
        return None
    if not value:
        raise ConfigError(f"{t.key(key)}: an empty path")
    path = Path(value)
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(f"{t.key(key)}: cannot read {path}: {exc.strerror}") from None
    return path


def _check_unique(config: Config) -> None:
    names = [s.name for s in config.sources]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"sources: the name {name!r} is used twice")
    owner: dict[str, str] = {config.redis.gap_stream: "gap stream (redis.gap_stream)"}
    for sub in config.subscriptions():
        for key, what in ((sub.stream, "stream"), (sub.dead_letter_stream, "dead-letter stream")):
            label = f"{what} of source {sub.source.name!r} event {sub.event!r}"
            if key in owner:
                raise ConfigError(
                    f"stream key {key!r} is the {label} and also the {owner[key]}: "
                    "give the sources different stream templates, e.g. stream = "
                    '"{source}:{event}"'
                )
            owner[key] = label


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
