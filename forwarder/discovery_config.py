"""The `[[discovery]]` table: its frozen settings, where the key comes from, and parsing.

Called by config.load_config() for each `[[discovery]]` table; reuses its typed table reader
and validation helpers, so messages look the same as for every other key. Errors are
ConfigErrors naming the key; none contains the API key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from forwarder.addresses import check_ws_url
from forwarder.config import (
    _NAME_RE,
    DEFAULT_STREAM,
    Secret,
    _check_events,
    _check_template,
    _parse_tls,
    _Table,
    _tls_paths,
    redact_url,
)
from forwarder.errors import ConfigError
from forwarder.events import SENT_EVENTS

DEFAULT_POLL_INTERVAL = 30.0
LISTING_PATH = "/instance/fetchInstances"  # the upstream's instance listing, under api_url
WS_PATH = "/ws/events"  # the upstream's event WebSocket, under the same server

_API_KEY_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: an HTTP header value


@dataclass(frozen=True)
class KeyRef:
    """Where a discovery table's global API key comes from.

    A file (or systemd credential) is read again before every poll, so a new key needs no
    restart; an environment value is captured at load. Never shown: see `origin`.
    """

    file: Path | None = None
    value: Secret | None = None
    origin: str = ""  # "discovery[0].api_key_file /etc/…"; never the value

    def read(self) -> Secret:
        """Return the key; raises ConfigError (without the key) when unusable."""
        if self.value is not None:
            return self.value
        assert self.file is not None
        try:
            text = self.file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{self.origin}: cannot read the API key: {reason}") from None
        return _check_api_key(text, self.origin)


def _check_api_key(text: str, origin: str) -> Secret:
    if not text:
        raise ConfigError(f"{origin}: the API key is empty")
    if not _API_KEY_RE.match(text):
        raise ConfigError(
            f"{origin}: the API key holds spaces, control or non-ASCII characters; it is sent "
            "as the apikey HTTP header, which cannot carry them"
        )
    return Secret(text)


@dataclass(frozen=True)
class DiscoveryConfig:
    """One `[[discovery]]` table: subscribe to every instance one upstream server lists.

    Each listed instance (filtered by `include`/`exclude`) becomes a source named after it,
    subscribed to `events` at `ws_url`, its frames going to `stream` (default: one stream per
    event shared by all instances, the `source` field telling them apart).
    """

    name: str  # label in logs, metrics and /status
    api_url: str  # http(s)://HOST:PORT[/prefix] of the upstream's REST API
    api_key: KeyRef
    ws_url: str  # ws(s)://HOST:PORT[/prefix]/ws/events
    events: tuple[str, ...] = SENT_EVENTS
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    poll_interval: float = DEFAULT_POLL_INTERVAL
    request_timeout: float = 10.0
    stream: str = DEFAULT_STREAM
    # TLS for https:// api_url and wss:// ws_url: as in SourceConfig.
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def listing_url(self) -> str:
        return self.api_url.rstrip("/") + LISTING_PATH

    def wants(self, instance: str) -> bool:
        """Whether an instance name passes the include and exclude globs (case-sensitive)."""
        return any(fnmatchcase(instance, g) for g in self.include) and not any(
            fnmatchcase(instance, g) for g in self.exclude
        )

    def redacted(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "api_url": redact_url(self.api_url),
            "api_key": f"*** ({self.api_key.origin})",
            "ws_url": redact_url(self.ws_url),
            "events": list(self.events),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "poll_interval": self.poll_interval,
            "request_timeout": self.request_timeout,
            "stream": self.stream,
            **_tls_paths(self.ca_file, self.client_cert, self.client_key),
        }


def parse_discovery(t: _Table, environ: Mapping[str, str]) -> DiscoveryConfig:
    """One [[discovery]] table. The key is read once here, so a bad one fails the start."""
    api_url = t.string("api_url", None)
    _check_api_url(api_url, t.key("api_url"))
    parts = urlsplit(api_url)
    name = t.optional_string("name")
    if name is None:
        name = parts.netloc
    elif not _NAME_RE.match(name):
        raise ConfigError(
            f"{t.key('name')}: {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    ws_scheme = "wss" if parts.scheme == "https" else "ws"
    ws_default = urlunsplit((ws_scheme, parts.netloc, parts.path.rstrip("/") + WS_PATH, "", ""))
    ws_url = t.string("ws_url", ws_default)
    check_ws_url(ws_url, t.key("ws_url"))
    tls = _parse_tls(t)
    if parts.scheme != "https" and urlsplit(ws_url).scheme != "wss":
        for key, path in tls.items():
            if path is not None:
                raise ConfigError(
                    f"{t.key(key)}: TLS settings need an https:// api_url or a wss:// ws_url: "
                    f"use them or remove {key}"
                )
    api_key = _parse_api_key(t, environ)
    events = _check_events(t.string_list("events", list(SENT_EVENTS)), t.key("events"))
    include = tuple(t.string_list("include", ["*"]))
    exclude = tuple(t.string_list("exclude", []))
    for key, globs in (("include", include), ("exclude", exclude)):
        if any(not g for g in globs):
            raise ConfigError(f"{t.key(key)}: an empty glob matches nothing; remove it")
    if not include:
        raise ConfigError(f"{t.key('include')}: empty: it would match no instance")
    stream = t.string("stream", DEFAULT_STREAM)
    _check_template(stream, {"source", "event"}, t.key("stream"))
    poll_interval = t.number("poll_interval", DEFAULT_POLL_INTERVAL, minimum=0.1)
    request_timeout = t.number("request_timeout", min(10.0, poll_interval), minimum=0.1)
    cfg = DiscoveryConfig(
        name=name,
        api_url=api_url,
        api_key=api_key,
        ws_url=ws_url,
        events=events,
        include=include,
        exclude=exclude,
        poll_interval=poll_interval,
        request_timeout=request_timeout,
        stream=stream,
        **tls,
    )
    t.finish()
    return cfg


def _parse_api_key(t: _Table, environ: Mapping[str, str]) -> KeyRef:
    """Exactly one of api_key_file, api_key_env, api_key_credential (a systemd credential)."""
    choices = {
        k: t.optional_string(k) for k in ("api_key_file", "api_key_env", "api_key_credential")
    }
    given = [k for k, v in choices.items() if v is not None]
    if len(given) != 1:
        raise ConfigError(
            f"{t.prefix}: set exactly one of api_key_file, api_key_env or api_key_credential "
            "(the server's global key; never put it in the file itself)"
        )
    key = given[0]
    value = choices[key]
    assert value is not None
    origin = f"{t.key(key)} {value}"
    if key == "api_key_env":
        if value not in environ:
            raise ConfigError(f"{origin}: the environment variable is not set")
        return KeyRef(value=_check_api_key(environ[value].strip(), origin), origin=origin)
    if key == "api_key_credential":
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"{origin}: CREDENTIALS_DIRECTORY is not set: a credential needs "
                f"LoadCredential={value}:/etc/forwarder/… in the systemd unit"
            )
        if not value or "/" in value:
            raise ConfigError(f"{origin}: a credential name, not a path")
        path = Path(directory.split(":")[0]) / value
    else:
        path = Path(value)
    ref = KeyRef(file=path, origin=origin)
    ref.read()  # fail at start, with a clear message, rather than at the first poll
    return ref


def _check_api_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{where}: expected an http:// or https:// URL, got {redact_url(url)!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{where}: no user or password in the URL: set api_key_file instead")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: no query or fragment: the server's base URL only")
