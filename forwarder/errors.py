"""Exceptions and exit codes of forwarder.

Library exceptions (h11, ssl, redis-py, OSError) are translated into these where they
leave our wrapper code, with a message that never contains the token.

    ForwarderError
    ├── ConfigError            invalid configuration or unreadable secret
    ├── UnreadableFile         a file the configuration names cannot be used (files.py)
    ├── TLSFileError           a TLS file does not load; names the setting (tls.py)
    ├── SubscriberError        one WebSocket connection failed
    │   ├── HandshakeRejected  the upgrade was answered with an HTTP status (401, 5xx…)
    │   └── ConnectFailed      no HTTP answer at all (refused, timeout, TLS, DNS)
    ├── DiscoveryError         listing a server's instances failed (discovery.py)
    ├── NotReplicated          fewer replicas than redis.wait_replicas confirmed a write
    └── FleetError             fleet mode could not do a Redis round trip
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes; systemd's RestartPreventExitStatus= names CONFIG."""

    OK = 0
    FAILURE = 1  # an unexpected error: worth a restart
    CONFIG = 2  # bad configuration or secret: a restart cannot help
    STARTUP = 3  # a resource could not be set up (metrics port in use…)
    FORCED = 130  # a second SIGINT/SIGTERM: the operator asked for an immediate exit


class ForwarderError(Exception):
    """Base class of every error forwarder raises on purpose."""


class ConfigError(ForwarderError):
    """The configuration or a secret it names is invalid; the message says which key and why."""


class UnreadableFile(ForwarderError):
    """A file the configuration names is missing, unreadable, too large or not a regular file.

    The message says why (never what the file holds); the caller adds which setting named it.
    """


class TLSFileError(ForwarderError):
    """A TLS file (CA bundle, client certificate or key) cannot be used.

    ``setting`` is the configuration key that names it: ``ca_file``, ``client_cert`` or
    ``client_key``; the message says why, without the file's contents.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


class SubscriberError(ForwarderError):
    """A WebSocket subscription failed; carries no URL with a token."""


class HandshakeRejected(SubscriberError):
    """The server answered the upgrade request with a non-101 HTTP status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"handshake rejected with HTTP {status}")
        self.status = status


class ConnectFailed(SubscriberError):
    """The connection failed before any HTTP status was received."""


class DiscoveryError(ForwarderError):
    """Listing instances failed; ``kind`` is the bounded error class used as a metric label.

    The message names the API URL and the reason, never the API key.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class NotReplicated(ForwarderError):
    """Redis applied a batch but WAIT saw fewer replicas confirm it than configured: the
    batch stays in the spool and is sent again (the high-water mark makes that safe)."""


class FleetError(ForwarderError):
    """A fleet round trip to Redis failed or got an unusable answer; ``kind`` is the bounded
    error class (as for forwarder_redis_errors_total).

    The member cannot tell whether the step was applied: it keeps what it holds until its
    own deadlines and tries again next round."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
