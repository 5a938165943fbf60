"""Checking addresses: source URLs, the Redis URL and the metrics listen address.

Each check raises ConfigError naming the key (or the environment variable) that supplied
the value, and never shows a password or a token (URLs are redacted). The aim is that every
mistake is found at load, by `check-config` too, rather than as a traceback in a thread
("Port out of range") or as an endless series of 401s (a `#fragment` swallowing the query
forwarder appends; see docs/upstream.md section 1).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, parse_qsl, urlsplit

from forwarder.errors import ConfigError
from forwarder.logs import redact as redact_url

UPSTREAM_PATH = "/ws/events"  # the only path the upstream serves the feed on
_DIGITS_RE = re.compile(r"^[0-9]{1,10}$")
# A DNS name (underscores allowed: container and compose service names use them).
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)
# redis-py reads options from the URL's query and lets them override its arguments (so
# ?socket_timeout= would undo ours); unknown ones fail only when the first connection is made.
_REDIS_URL_OPTIONS = ("db", "client_name")


def check_ws_url(url: str, where: str) -> None:
    """Every part of a source URL, so that a mistake is an error naming `where` now rather
    than a traceback in a subscriber or an endless series of 401s blamed on the token."""
    shown = redact_url(url)
    parts = _split_url(url, where)
    if parts.scheme not in {"ws", "wss"}:
        raise ConfigError(f"{where}: expected a ws:// or wss:// URL, got {shown!r}")
    if "#" in url:
        raise ConfigError(
            f"{where}: remove the '#' part: forwarder appends ?event=...&token=... to the URL, "
            "and whatever follows a '#' is never sent, so the upstream would see neither and "
            "answer every connection with HTTP 401"
        )
    if "?" in url:
        raise ConfigError(
            f"{where}: put no query in the URL (event and token are added per subscription; "
            "a token in the URL would leak into logs)"
        )
    if "@" in parts.netloc:
        raise ConfigError(
            f"{where}: remove the 'user@' part: the upstream authenticates with the token "
            "alone (token_file or token_env), and a password in a URL would end up in logs"
        )
    _check_host_port(parts, url, where)
    if not parts.path:
        raise ConfigError(
            f"{where}: the URL has no path; the upstream serves the event feed at "
            f"{UPSTREAM_PATH}, e.g. ws://HOST:8084{UPSTREAM_PATH}"
        )


def _split_url(url: str, where: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced '[' around an IPv6 address
        raise ConfigError(f"{where}: not a valid URL ({exc}): {redact_url(url)!r}") from None


def _check_host_port(parts: SplitResult, url: str, where: str) -> None:
    """The host is a name or an IP address, the port (if any) a number from 1 to 65535."""
    host = parts.hostname
    if not host:
        raise ConfigError(f"{where}: the URL has no host: {redact_url(url)!r}")
    if not _valid_host(host):
        raise ConfigError(
            f"{where}: {host!r} is not a host name or IP address (an IPv6 address goes in "
            "brackets, a non-ASCII name in its xn-- form)"
        )
    try:
        port = parts.port
    except ValueError:  # not a number, or beyond 65535
        port = 0
    if port == 0 or (port is None and parts.netloc.rstrip("]").endswith(":")):
        raw = parts.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]
        raise ConfigError(f"{where}: the port must be a number from 1 to 65535, got {raw!r}")


def check_redis_url(url: str, where: str = "redis.url") -> None:
    """Raise ConfigError (naming `where`, without the password) unless `url` is a Redis URL
    forwarder can use; also used for `forwarder watch --redis-url`."""
    shown = redact_url(url)
    parts = _split_url(url, where)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError(
            f"{where}: expected redis://, rediss://, unix://, redis+sentinel:// or "
            f"redis+cluster://, got {shown!r}"
        )
    if "#" in url:
        raise ConfigError(
            f"{where}: remove the '#' part (redis-py ignores it; in a password write # as %23)"
        )
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower().startswith("ssl"):
            raise ConfigError(
                f"{where}: no ssl_* options in the URL: set redis.ca_file, redis.client_cert "
                "and redis.client_key; certificate and host name verification are always on"
            )
        if name not in _REDIS_URL_OPTIONS:
            raise ConfigError(
                f"{where}: unknown option {name!r} in the URL: only db and client_name are "
                "read there; timeouts, retries and TLS are [redis] settings"
            )
        if name == "db" and not _DIGITS_RE.match(value):
            raise ConfigError(f"{where}: db must be a database number, got {value!r}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(
                f"{where}: a unix:// URL needs the socket's path, e.g. "
                "unix:///run/redis/redis.sock?db=0"
            )
        return
    _check_host_port(parts, url, where)
    if parts.path not in {"", "/"} and not _DIGITS_RE.match(parts.path[1:]):
        raise ConfigError(
            f"{where}: the path is the database number (redis://HOST:6379/0), got {parts.path!r}"
        )


def split_listen(listen: str, where: str = "metrics.listen") -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not _DIGITS_RE.match(port):
        raise ConfigError(f"{where}: expected HOST:PORT, got {listen!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    host = (host[1:-1] if bracketed else host) or "127.0.0.1"
    if not _valid_host(host) or (":" in host and not bracketed):
        raise ConfigError(
            f"{where}: {host!r} is not a host name or IP address (an IPv6 address goes in "
            "brackets: [::1]:9108)"
        )
    number = int(port)
    if number > 65535:
        raise ConfigError(f"{where}: port {number} is out of range (0-65535; 0 picks a free one)")
    return host, number


def _valid_host(host: str) -> bool:
    """An IP address or a DNS name; what a socket can be asked to connect to or bind."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return _HOSTNAME_RE.match(host) is not None
    return True


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps a port off the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that may resolve to any interface
