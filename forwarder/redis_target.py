"""How forwarder connects to Redis: the client factory.

Timeouts are always on and redis-py's own re-sends are off: they re-send writes that Redis
may already have applied (see docs/redis.md); the writer retries itself, safely, because its
batch script is idempotent.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from forwarder.config import RedisConfig

log = logging.getLogger(__name__)

TLS_ERROR_LOG_INTERVAL = 60.0  # seconds between two ERROR lines about a failing TLS handshake


def make_client(config: RedisConfig) -> redis.Redis:
    """A Redis client with timeouts on and redis-py's automatic re-sends off.

    rediss://: TLS 1.2 or later, the server's certificate and host name always verified
    (against `ca_file` in addition to the system trust store: redis-py loads both), and a
    client certificate if configured; a failed TLS handshake is logged at ERROR.
    """
    tls: dict[str, Any] = {}
    if urlsplit(config.url).scheme == "rediss":
        tls = {"connection_class": _TLSConnection, **tls_options(config)}
    return redis.Redis.from_url(
        config.url,
        socket_timeout=config.socket_timeout,
        socket_connect_timeout=config.socket_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        **tls,
    )


def tls_options(config: RedisConfig) -> dict[str, Any]:
    """redis-py's TLS keyword arguments: verification always on, TLS 1.2 or later."""
    return {
        "ssl_ca_certs": str(config.ca_file) if config.ca_file else None,
        "ssl_certfile": str(config.client_cert) if config.client_cert else None,
        "ssl_keyfile": str(config.client_key) if config.client_key else None,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_min_version": ssl.TLSVersion.TLSv1_2,
    }


class _TLSConnection(redis.SSLConnection):
    """redis-py's TLS connection; a failed handshake is a configuration problem (CA, host
    name, client certificate), not a passing outage, so it is also logged at ERROR (at most
    once a minute per connection: the pool reuses the connection object after a failure)."""

    _tls_error_logged_at = -TLS_ERROR_LOG_INTERVAL  # monotonic

    def _connect(self) -> socket.socket:
        try:
            sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]
        except ssl.SSLError as exc:
            now = time.monotonic()
            if now - self._tls_error_logged_at >= TLS_ERROR_LOG_INTERVAL:
                self._tls_error_logged_at = now
                why = (
                    f"the server's certificate was refused ({exc.verify_message}): check "
                    "redis.ca_file and that the host name in redis.url is one the "
                    "certificate names"
                    if isinstance(exc, ssl.SSLCertVerificationError)
                    else f"{exc}; if Redis requires a client certificate (tls-auth-clients), "
                    "set redis.client_cert"
                )
                log.error("Redis TLS handshake with %s:%s failed: %s", self.host, self.port, why)
            raise
        return sock
