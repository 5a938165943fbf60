"""Where the writer's batches go: one Redis, the master a Sentinel quorum names, or the
masters of a Redis Cluster, each slot's batch to the node that owns the slot.

A `RedisTarget` hands the writer a connection for the slot of a key and learns from errors
(a MOVED slot map, a failed node). Every topology is used the same way: the writer packs its
script call itself and sends it on that connection. Timeouts are always on and redis-py's
own re-sends are off: they re-send writes that Redis may already have applied (see
docs/redis.md); the writer retries itself, safely, because its batch script is idempotent.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import Connection, ConnectionPool
from redis.crc import key_slot
from redis.retry import Retry
from redis.sentinel import Sentinel

from forwarder.config import RedisConfig, redis_hosts

log = logging.getLogger(__name__)

TLS_ERROR_LOG_INTERVAL = 60.0  # seconds between two ERROR lines about a failing TLS handshake
_ASKING = b"*1\r\n$6\r\nASKING\r\n"


def make_target(config: RedisConfig) -> RedisTarget:
    """The target `config` names: redis+sentinel://, redis+cluster:// (or `cluster = true`),
    else one Redis (redis://, rediss://, unix://). Connects lazily: a Redis that is down at
    start is the writer's business (it retries), not a start-up failure."""
    scheme = urlsplit(config.url).scheme
    if scheme == "redis+sentinel":
        return SentinelTarget(config)
    if scheme == "redis+cluster" or config.cluster:
        return ClusterTarget(config)
    return SingleTarget(config)


def _common(config: RedisConfig) -> dict[str, Any]:
    """Client options every topology shares: timeouts on, redis-py's re-sends off."""
    return {
        "socket_timeout": config.socket_timeout,
        "socket_connect_timeout": config.socket_timeout,
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }


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


def make_client(config: RedisConfig) -> redis.Redis:
    """A client for one Redis, with timeouts on and redis-py's automatic re-sends off.

    rediss://: TLS 1.2 or later, the server's certificate and host name always verified
    (against `ca_file` in addition to the system trust store: redis-py loads both), and a
    client certificate if configured; a failed TLS handshake is logged at ERROR.
    """
    tls: dict[str, Any] = {}
    if urlsplit(config.url).scheme == "rediss":
        tls = {"connection_class": _TLSConnection, **tls_options(config)}
    return redis.Redis.from_url(config.url, **_common(config), **tls)


class RedisTarget:
    """One Redis (redis://, rediss://, unix://). Base class of the other topologies.

    Thread-safety: the writer thread calls everything but `describe`, which HTTP threads
    call; it reads only fields assigned whole (safe under the GIL).
    """

    topology = "single"
    cluster = False  # True: one script call per hash slot, no cross-slot keys

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.master: str | None = None  # host:port of the last successful write

    def connection(self, key: str) -> tuple[ConnectionPool, Connection]:
        """A connection to the node that owns `key` (here: the one Redis)."""
        pool = self.client.connection_pool
        return pool, pool.get_connection()

    def node_connection(self, host: str, port: int) -> tuple[ConnectionPool, Connection]:
        """A connection to a named node (a Cluster ASK redirection)."""
        raise rex.ResponseError(f"redirected to {host}:{port} outside a cluster")

    def run(
        self, key: str, command: bytes, script: str, then: bytes | None = None
    ) -> tuple[object, object]:
        """Send `command` (a packed EVALSHA of `script`), and `then` after it if given (a
        packed WAIT, which must follow on the same connection), to the node that owns
        `key`, in one round trip; returns (the script's reply, then's reply or None).

        NOSCRIPT (a restarted, flushed or newly promoted node) loads the script on that
        connection and sends the call again: safe, NOSCRIPT means nothing ran. ASK (a slot
        being migrated) sends it to the node named, after ASKING; MOVED goes up (see
        `failed`). A connection that failed is closed, never reused: a late reply could
        answer the next request.
        """
        pool, conn = self.connection(key)
        held: Connection | None = conn  # released exactly once, in `finally`
        asking = False
        try:
            for attempt in (1, 2, 3):
                try:
                    return self._round_trip(conn, command, asking, then)
                except rex.NoScriptError:
                    if attempt == 3:
                        raise
                    conn.send_command("SCRIPT", "LOAD", script)  # type: ignore[no-untyped-call]
                    conn.read_response()
                except rex.AskError as exc:
                    # MOVED is an AskError too: it goes up, `failed` reloads the slot map.
                    if isinstance(exc, rex.MovedError) or asking or attempt == 3:
                        raise
                    pool.release(conn)
                    held = None
                    pool, conn = self.node_connection(exc.host, exc.port)
                    held = conn
                    asking = True
                except (rex.ConnectionError, rex.TimeoutError):
                    conn.disconnect()  # type: ignore[no-untyped-call]
                    raise
            raise AssertionError("unreachable")
        finally:
            if held is not None:
                pool.release(held)

    def _round_trip(
        self, conn: Connection, command: bytes, asking: bool, then: bytes | None
    ) -> tuple[object, object]:
        """[ASKING,] command [, then] in one send; every reply is read before an error is
        raised, so the connection stays in step."""
        packed = [_ASKING, command] if asking else [command]
        if then is not None:
            packed.append(then)
        conn.send_packed_command(packed)  # type: ignore[no-untyped-call]
        error: rex.ResponseError | None = None
        replies: list[object] = []
        for _ in packed:
            try:
                replies.append(conn.read_response())
            except rex.ResponseError as exc:
                error = error or exc
                replies.append(None)
        if error is not None:
            raise error
        self.wrote(conn)
        first = 1 if asking else 0
        return replies[first], replies[first + 1] if then is not None else None

    def wrote(self, conn: Connection) -> None:
        """A call on `conn` succeeded: remember which node took it."""
        self.master = f"{conn.host}:{conn.port}" if getattr(conn, "host", None) else "unix"

    def failed(self, exc: BaseException) -> None:
        """A call failed with `exc`: refresh what the error says is stale."""

    def ping(self) -> None:
        self.client.ping()

    def pools(self) -> list[ConnectionPool]:
        return [self.client.connection_pool]

    def set_socket_timeout(self, seconds: float) -> None:
        """Socket timeouts of `seconds` from the next connection on (handshake included).
        The pools are emptied so that no connection keeps the old timeout."""
        for pool in self.pools():
            kwargs = dict(pool.connection_kwargs)
            kwargs["socket_timeout"] = seconds
            pool.connection_kwargs = kwargs
            pool.disconnect()
            pool.reset()

    def describe(self) -> dict[str, Any]:
        """For /status: the topology and the master(s) last written to."""
        return {"topology": self.topology, "masters": [self.master] if self.master else []}

    def close(self) -> None:
        self.client.close()


class SingleTarget(RedisTarget):
    def __init__(self, config: RedisConfig) -> None:
        super().__init__(make_client(config))


class SentinelTarget(RedisTarget):
    """redis+sentinel://[user:pass@]host1:26379,host2:26379/SERVICE[/DB].

    redis-py's Sentinel support asks the Sentinels for the current master on each new
    connection; a master demoted to replica answers READONLY, which redis-py turns into a
    ConnectionError (transient: the next connection finds the new master). The URL's user
    and password are for the master; Sentinels are asked without credentials.
    """

    topology = "sentinel"

    def __init__(self, config: RedisConfig) -> None:
        parts = urlsplit(config.url)
        path = [p for p in parts.path.split("/") if p]
        self.service = unquote(path[0])
        db = int(path[1]) if len(path) > 1 else 0
        options = _common(config)
        self.sentinel = Sentinel(  # type: ignore[no-untyped-call]
            redis_hosts(config.url),
            sentinel_kwargs={
                "socket_timeout": config.socket_timeout,
                "socket_connect_timeout": config.socket_timeout,
            },
            **options,
        )
        client = self.sentinel.master_for(  # type: ignore[no-untyped-call]
            self.service,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            **options,
        )
        super().__init__(client)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "service": self.service}


class ClusterTarget(RedisTarget):
    """Redis Cluster: redis+cluster://[user:pass@]host1:port1,host2:port2 or `cluster = true`
    with a redis:// (or rediss://) URL naming one node. redis-py's RedisCluster keeps the slot
    map and one pool per node; the writer sends each slot's call to the slot's master and
    reloads the map after MOVED, a failed node, CLUSTERDOWN or READONLY (a stale map after a
    failover). The cluster is contacted on first use, not at start."""

    topology = "cluster"
    cluster = True

    def __init__(self, config: RedisConfig) -> None:
        parts = urlsplit(config.url)
        self._nodes = [ClusterNode(host, port) for host, port in redis_hosts(config.url)]  # type: ignore[no-untyped-call]
        self._options: dict[str, Any] = {
            **_common(config),
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "require_full_coverage": False,  # a slot without master must not stop the others
        }
        if parts.scheme == "rediss":
            self._options.update(ssl=True, **tls_options(config))
        self._cluster: RedisCluster | None = None
        self._lock = threading.Lock()  # _cluster is built by the writer, read by describe()
        self.masters: list[str] = []

    def _get(self) -> RedisCluster:
        if self._cluster is None:
            try:
                cluster = RedisCluster(startup_nodes=self._nodes, **self._options)
            except rex.RedisClusterException as exc:
                raise rex.ConnectionError(f"no cluster node answered: {exc}") from None
            with self._lock:
                self._cluster = cluster
            self._remember_masters()
        return self._cluster

    def _remember_masters(self) -> None:
        cluster = self._cluster
        if cluster is not None:
            self.masters = sorted(node.name for node in cluster.get_primaries())  # type: ignore[no-untyped-call]

    def connection(self, key: str) -> tuple[ConnectionPool, Connection]:
        cluster = self._get()
        node = cluster.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        return self._pool_connection(cluster, node)

    def node_connection(self, host: str, port: int) -> tuple[ConnectionPool, Connection]:
        cluster = self._get()
        node = cluster.get_node(host=host, port=port)  # type: ignore[no-untyped-call]
        if node is None:
            self._refresh()
            raise rex.ConnectionError(f"redirected to {host}:{port}, a node not in the map yet")
        return self._pool_connection(cluster, node)

    @staticmethod
    def _pool_connection(
        cluster: RedisCluster, node: ClusterNode
    ) -> tuple[ConnectionPool, Connection]:
        client = cluster.get_redis_connection(node)
        pool = client.connection_pool
        return pool, pool.get_connection()

    def wrote(self, conn: Connection) -> None:
        self.master = f"{conn.host}:{conn.port}"

    def failed(self, exc: BaseException) -> None:
        if isinstance(
            exc,
            rex.MovedError
            | rex.ConnectionError
            | rex.TimeoutError
            | rex.ClusterDownError
            | rex.ReadOnlyError
            | rex.SlotNotCoveredError,
        ):
            self._refresh()

    def _refresh(self) -> None:
        """Reload the slot map (a failover or a migration moved slots)."""
        cluster = self._cluster
        if cluster is None:
            return
        try:
            cluster.nodes_manager.initialize()
        except rex.RedisError as exc:
            log.debug("cluster slot map not reloaded yet: %s", exc)
        self._remember_masters()

    def ping(self) -> None:
        self._get().ping(target_nodes=RedisCluster.PRIMARIES)

    def pools(self) -> list[ConnectionPool]:
        cluster = self._cluster
        if cluster is None:
            return []
        return [
            node.redis_connection.connection_pool
            for node in cluster.get_nodes()  # type: ignore[no-untyped-call]
            if node.redis_connection is not None
        ]

    def set_socket_timeout(self, seconds: float) -> None:
        self._options["socket_timeout"] = seconds
        cluster = self._cluster
        if cluster is not None:
            cluster.nodes_manager.connection_kwargs["socket_timeout"] = seconds
        super().set_socket_timeout(seconds)

    def describe(self) -> dict[str, Any]:
        return {"topology": self.topology, "masters": list(self.masters)}

    def close(self) -> None:
        with self._lock:
            cluster = self._cluster
        if cluster is not None:
            cluster.close()


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
