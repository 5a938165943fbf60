"""Transport security and secret hygiene, with certificates the tests generate (trustme).

wss:// against the simulator over real TLS, rediss:// against a TLS-only redis-server, client
certificates, refused certificates (unknown CA, wrong host name), configuration checks, and a
canary token that must appear nowhere, even in DEBUG logs.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import subprocess
import sys
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis
import trustme
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from forwarder.config import Config, Secret, SourceConfig, TokenRef, load_config
from forwarder.daemon import Forwarder
from forwarder.errors import ConfigError, ConnectFailed, HandshakeRejected
from forwarder.handshake import websocket_connect
from forwarder.logs import setup_logging
from forwarder.tls import tls_context
from forwarder_sim import Simulator, mint_token
from tests.conftest import SECRET
from tests.helpers import RedisServer, free_port, wait_for, xrange

EVENT = "messages.upsert"
FAST = "backoff = { initial = 0.05, maximum = 0.2, auth_initial = 0.1, auth_maximum = 0.3 }"


# ---------------------------------------------------------------------------------------------
# A test PKI, TLS servers and configuration files


@dataclass(frozen=True)
class Certs:
    """PEM files of a test PKI: `ca` signed every certificate; `other_ca` signed none."""

    ca: trustme.CA
    ca_file: Path
    other_ca_file: Path
    server: trustme.LeafCert  # localhost and 127.0.0.1
    wrong_host: trustme.LeafCert  # other.example only
    redis_cert: Path  # localhost only: rediss://127.0.0.1 is a host name mismatch
    redis_key: Path
    client_cert: Path
    client_key: Path
    client_combined: Path  # the client's key and certificate in one file
    client_key_encrypted: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, server and client certificates, and an unrelated CA, written to PEM files."""
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(d / "other-ca.pem"))
    redis_leaf = ca.issue_cert("localhost")
    for blob in redis_leaf.cert_chain_pems:
        blob.write_to_path(str(d / "redis.pem"), append=True)
    redis_leaf.private_key_pem.write_to_path(str(d / "redis.key"))
    client = ca.issue_cert("forwarder-client")
    for blob in client.cert_chain_pems:
        blob.write_to_path(str(d / "client.pem"), append=True)
    client.private_key_pem.write_to_path(str(d / "client.key"))
    client.private_key_and_cert_chain_pem.write_to_path(str(d / "client-combined.pem"))
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), password=None)
    (d / "client-encrypted.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return Certs(
        ca=ca,
        ca_file=d / "ca.pem",
        other_ca_file=d / "other-ca.pem",
        server=ca.issue_cert("localhost", "127.0.0.1"),
        wrong_host=ca.issue_cert("other.example"),
        redis_cert=d / "redis.pem",
        redis_key=d / "redis.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        client_combined=d / "client-combined.pem",
        client_key_encrypted=d / "client-encrypted.key",
    )


def server_context(leaf: trustme.LeafCert, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    """A server-side TLS context presenting `leaf`; with `client_ca`, client certificates
    signed by it are required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(context)
    return context


@pytest.fixture
def start_simulator() -> Iterator[Callable[[ssl.SSLContext], Simulator]]:
    """Start simulators serving wss:// with the given context; all stopped at the end."""
    started: list[Simulator] = []

    def start(context: ssl.SSLContext) -> Simulator:
        sim = Simulator(secret=SECRET, record=True, ssl_context=context)
        sim.start()
        started.append(sim)
        assert sim.url.startswith("wss://127.0.0.1:")
        return sim

    yield start
    for sim in started:
        sim.stop()


class TLSRedisServer(RedisServer):
    """A redis-server listening only on a TLS port (`--port 0`), with the test CA's
    certificate for localhost; clients are not asked for certificates."""

    def __init__(self, workdir: Path, certs: Certs) -> None:
        self.tls_port = free_port()
        self.ca_file = certs.ca_file
        # RedisServer passes --port first; the later --port 0 wins (no plain TCP listener).
        super().__init__(
            workdir,
            "--port",
            "0",
            "--tls-port",
            str(self.tls_port),
            "--tls-cert-file",
            str(certs.redis_cert),
            "--tls-key-file",
            str(certs.redis_key),
            "--tls-ca-cert-file",
            str(certs.ca_file),
            "--tls-auth-clients",
            "no",
        )

    @property
    def tls_url(self) -> str:
        return f"rediss://localhost:{self.tls_port}/0"

    def client(self) -> redis.Redis:
        """A verifying TLS client (also what `start()` pings: a plain one would never work)."""
        return redis.Redis(
            host="localhost",
            port=self.tls_port,
            socket_timeout=5,
            ssl=True,
            ssl_ca_certs=str(self.ca_file),
            ssl_check_hostname=True,
        )


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[TLSRedisServer]:
    """A TLS-only redis-server; one without TLS support fails the run with redis' reason."""
    server = TLSRedisServer(tmp_path_factory.mktemp("redis-tls"), certs)
    probe = subprocess.run(
        [server.binary, "--port", "0", "--tls-port", "0", "--save", ""],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if "not listen anywhere" not in probe.stdout + probe.stderr:
        raise AssertionError(
            "this redis-server does not accept TLS options (built without BUILD_TLS=yes?): "
            + (probe.stdout + probe.stderr)[-500:]
        )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tls_client(tls_redis: TLSRedisServer) -> Iterator[redis.Redis]:
    """A TLS client on an empty database of the TLS redis-server."""
    client = tls_redis.client()
    client.flushall()
    yield client
    client.close()


def write_config(
    tmp_path: Path,
    url: str,
    redis_url: str,
    *,
    source_extra: str = "",
    redis_extra: str = "",
    token: str | None = None,
    shutdown_timeout: float = 5.0,
) -> Path:
    """A configuration file with one source `main` subscribed to EVENT."""
    token_file = tmp_path / "main.token"
    token_file.write_text((token or mint_token("main", SECRET)) + "\n")
    lines = [
        f"shutdown_timeout = {shutdown_timeout}",
        "[spool]",
        f'dir = "{tmp_path / "spool"}"',
        "[redis]",
        f'url = "{redis_url}"',
        redis_extra,
        "[metrics]",
        'listen = "127.0.0.1:0"',
        "[[sources]]",
        'name = "main"',
        f'url = "{url}"',
        f'token_file = "{token_file}"',
        f'events = ["{EVENT}"]',
        FAST,
        source_extra,
    ]
    path = tmp_path / "forwarder.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def load(path: Path) -> Config:
    return load_config(path, {})


def fetch(forwarder: Forwarder, path: str) -> str:
    """GET an endpoint of the in-process forwarder; the body also for 4xx/5xx answers."""
    url = f"http://127.0.0.1:{forwarder.http.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())


def metric(forwarder: Forwarder, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(fetch(forwarder, "/metrics")):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def connected(forwarder: Forwarder) -> bool:
    return all(s.state.value == "connected" for s in forwarder.stats if s.configured)


def error_failures(forwarder: Forwarder) -> int:
    return forwarder.stats[0].handshake_failures.get("error", 0)


# ---------------------------------------------------------------------------------------------
# wss://


def test_wss_with_the_configured_ca_delivers_frames_to_redis(
    tmp_path: Path,
    certs: Certs,
    start_simulator: Callable[[ssl.SSLContext], Simulator],
    redis_server: RedisServer,
    redis_client: redis.Redis,
    run_forwarder: Callable[..., Forwarder],
) -> None:
    """ca_file = the test CA: forwarder connects over TLS and every frame lands in Redis."""
    sim = start_simulator(server_context(certs.server))
    config = load(
        write_config(
            tmp_path, sim.url, redis_server.url, source_extra=f'ca_file = "{certs.ca_file}"'
        )
    )
    forwarder = run_forwarder(config)
    wait_for(lambda: connected(forwarder), 10, "connected over TLS")
    sim.send("main", EVENT, 5)
    wait_for(lambda: redis_client.xlen(EVENT) == 5, 10, "5 frames in Redis")
    frames = [f[b"data"] for _, f in xrange(redis_client, EVENT)]
    assert frames == sim.delivered_frames("main", EVENT)
    assert error_failures(forwarder) == 0


def test_a_dropped_wss_connection_reconnects_and_loses_nothing(
    tmp_path: Path,
    certs: Certs,
    start_simulator: Callable[[ssl.SSLContext], Simulator],
    redis_server: RedisServer,
    redis_client: redis.Redis,
    run_forwarder: Callable[..., Forwarder],
) -> None:
    """The server ending a TLS connection (close_notify, FIN) is a 1006; both sides arrive."""
    sim = start_simulator(server_context(certs.server))
    config = load(
        write_config(
            tmp_path, sim.url, redis_server.url, source_extra=f'ca_file = "{certs.ca_file}"'
        )
    )
    forwarder = run_forwarder(config)
    wait_for(lambda: connected(forwarder), 10, "connected over TLS")
    sim.send("main", EVENT, 3)
    wait_for(lambda: redis_client.xlen(EVENT) == 3, 10, "3 frames in Redis")
    assert sim.drop() == 1
    wait_for(lambda: forwarder.stats[0].close_codes.get("1006", 0) == 1, 10, "the drop seen")
    wait_for(lambda: connected(forwarder), 10, "reconnected over TLS")
    sim.send("main", EVENT, 3)
    wait_for(lambda: redis_client.xlen(EVENT) == 6, 10, "6 frames in Redis")
    frames = [f[b"data"] for _, f in xrange(redis_client, EVENT)]
    assert frames == sim.delivered_frames("main", EVENT)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown CA", "unable to get local issuer certificate"),
        ("other host name", "certificate is not valid for '127.0.0.1'"),
    ],
)
def test_wss_server_with_an_untrusted_certificate_is_refused(
    case: str,
    reason: str,
    tmp_path: Path,
    certs: Certs,
    start_simulator: Callable[[ssl.SSLContext], Simulator],
    redis_server: RedisServer,
    run_forwarder: Callable[..., Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A certificate from an unknown CA or for another host is refused, counted and explained."""
    leaf = certs.server if case == "unknown CA" else certs.wrong_host
    ca_file = certs.other_ca_file if case == "unknown CA" else certs.ca_file
    sim = start_simulator(server_context(leaf))
    config = load(
        write_config(tmp_path, sim.url, redis_server.url, source_extra=f'ca_file = "{ca_file}"')
    )
    with caplog.at_level(logging.WARNING, logger="forwarder"):
        forwarder = run_forwarder(config)
        wait_for(lambda: error_failures(forwarder) >= 2, 10, "two refused handshakes")
        assert metric(forwarder, "forwarder_handshake_failures_total", status="error") >= 2
    refusals = [
        r.getMessage() for r in caplog.records if "certificate was refused" in r.getMessage()
    ]
    assert refusals, caplog.text
    assert reason in refusals[0]
    assert "ca_file" in refusals[0]  # says what to check
    assert sim.stats()["connections_total"] == 0  # no TLS session was ever established
    assert forwarder.stats[0].state.value != "connected"


@pytest.mark.parametrize("client", ["separate key", "key in the certificate file", "none"])
def test_a_client_certificate_required_by_the_server(
    client: str,
    tmp_path: Path,
    certs: Certs,
    start_simulator: Callable[[ssl.SSLContext], Simulator],
    redis_server: RedisServer,
    redis_client: redis.Redis,
    run_forwarder: Callable[..., Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server requiring client certificates accepts our configured one and refuses us without."""
    sim = start_simulator(server_context(certs.server, client_ca=certs.ca))
    extra = {
        "separate key": f'client_cert = "{certs.client_cert}"\nclient_key = "{certs.client_key}"',
        "key in the certificate file": f'client_cert = "{certs.client_combined}"',
        "none": "",
    }[client]
    config = load(
        write_config(
            tmp_path,
            sim.url,
            redis_server.url,
            source_extra=f'ca_file = "{certs.ca_file}"\n{extra}',
        )
    )
    with caplog.at_level(logging.WARNING, logger="forwarder"):
        forwarder = run_forwarder(config)
        if client == "none":
            wait_for(lambda: error_failures(forwarder) >= 2, 10, "two refused handshakes")
            assert sim.stats()["connections_total"] == 0
            assert forwarder.stats[0].state.value != "connected"
            assert "client certificate (client_cert)" in caplog.text  # a hint at the cause
            return
        wait_for(lambda: connected(forwarder), 10, "connected with a client certificate")
    sim.send("main", EVENT, 3)
    wait_for(lambda: redis_client.xlen(EVENT) == 3, 10, "3 frames in Redis")
    assert error_failures(forwarder) == 0


def test_tls_context_is_strict_shared_and_rebuilt_when_a_file_changes(
    tmp_path: Path, certs: Certs
) -> None:
    """One verifying TLS >= 1.2 context per set of files; a renewed file gets a new one."""
    cert = tmp_path / "client.pem"
    shutil.copy(certs.client_combined, cert)
    source = SourceConfig(
        name="a",
        url="wss://127.0.0.1:1/ws/events",
        token=TokenRef(value=Secret("x.y.z"), origin="test"),
        ca_file=certs.ca_file,
        client_cert=cert,
    )
    first = tls_context(source)
    assert first is not None
    assert first.minimum_version == ssl.TLSVersion.TLSv1_2
    assert first.verify_mode == ssl.CERT_REQUIRED
    assert first.check_hostname
    assert tls_context(replace(source, name="b")) is first  # same files: shared
    assert tls_context(replace(source, url="ws://127.0.0.1:1/ws/events")) is None
    renewed = cert.stat().st_mtime_ns + 1_000_000_000
    os.utime(cert, ns=(renewed, renewed))
    assert tls_context(source) is not first
    cert.unlink()
    with pytest.raises(ConnectFailed, match="TLS files of source a"):
        tls_context(source)


# ---------------------------------------------------------------------------------------------
# rediss://


def test_rediss_with_the_configured_ca_writes_frames(
    tmp_path: Path,
    certs: Certs,
    tls_redis: TLSRedisServer,
    tls_client: redis.Redis,
    simulator: Simulator,
    run_forwarder: Callable[..., Forwarder],
) -> None:
    """rediss://localhost with ca_file = the test CA: frames land in the TLS-only Redis."""
    config = load(
        write_config(
            tmp_path,
            simulator.url,
            tls_redis.tls_url,
            redis_extra=f'ca_file = "{certs.ca_file}"',
        )
    )
    forwarder = run_forwarder(config)
    wait_for(lambda: connected(forwarder), 10, "subscribed")
    simulator.send("main", EVENT, 5)
    wait_for(lambda: tls_client.xlen(EVENT) == 5, 10, "5 frames in Redis over TLS")
    frames = [f[b"data"] for _, f in xrange(tls_client, EVENT)]
    assert frames == simulator.delivered_frames("main", EVENT)
    assert sum(forwarder.writer_stats.errors.values()) == 0


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        # redis-server sends its CA along (tls-ca-cert-file), hence "self-signed".
        ("unknown CA", "self-signed certificate in certificate chain"),
        ("other host name", "certificate is not valid for '127.0.0.1'"),
    ],
)
def test_rediss_with_an_untrusted_certificate_fails_loudly_and_keeps_the_frames(
    case: str,
    reason: str,
    tmp_path: Path,
    certs: Certs,
    tls_redis: TLSRedisServer,
    tls_client: redis.Redis,
    simulator: Simulator,
    run_forwarder: Callable[..., Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis' certificate from an unknown CA or for another host: ERROR, counted, frames spooled."""
    if case == "unknown CA":
        url, ca_file = tls_redis.tls_url, certs.other_ca_file
    else:  # the certificate names localhost only
        url, ca_file = f"rediss://127.0.0.1:{tls_redis.tls_port}/0", certs.ca_file
    config = load(
        write_config(
            tmp_path,
            simulator.url,
            url,
            redis_extra=f'ca_file = "{ca_file}"',
            shutdown_timeout=0.5,  # Redis stays unusable: do not wait long for the drain
        )
    )
    with caplog.at_level(logging.INFO, logger="forwarder"):
        forwarder = run_forwarder(config)
        wait_for(lambda: connected(forwarder), 10, "subscribed")
        simulator.send("main", EVENT, 5)
        wait_for(lambda: forwarder.stats[0].received == 5, 10, "5 frames received")
        wait_for(
            lambda: any(
                r.levelno == logging.ERROR and "Redis TLS handshake" in r.getMessage()
                for r in caplog.records
            ),
            10,
            "an ERROR about the TLS handshake",
        )
        assert metric(forwarder, "forwarder_redis_errors_total", kind="connection") >= 1
        assert metric(forwarder, "forwarder_spool_pending_messages") == 5
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert reason in errors[0]
    assert "redis.ca_file" in errors[0]
    assert forwarder.spool.pending()[0] == 5  # nothing lost, nothing written
    assert tls_client.xlen(EVENT) == 0


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("url", "redis_url", "source_extra", "redis_extra", "message"),
    [
        (
            "ws://127.0.0.1:1/ws/events",
            "redis://127.0.0.1:1/0",
            'ca_file = "{ca}"',
            "",
            "sources[0].ca_file: TLS settings need a wss:// URL",
        ),
        (
            "wss://127.0.0.1:1/ws/events",
            "redis://127.0.0.1:1/0",
            'ca_file = "{missing}"',
            "",
            "sources[0].ca_file: cannot read",
        ),
        (
            "wss://127.0.0.1:1/ws/events",
            "redis://127.0.0.1:1/0",
            'ca_file = "{token}"',
            "",
            "sources[0].ca_file: {token} holds no usable PEM CA certificate",
        ),
        (
            "wss://127.0.0.1:1/ws/events",
            "redis://127.0.0.1:1/0",
            'client_key = "{key}"',
            "",
            "sources[0].client_key: set client_cert too",
        ),
        (
            "wss://127.0.0.1:1/ws/events",
            "redis://127.0.0.1:1/0",
            'client_cert = "{cert}"',
            "",
            "if the key is in a separate file, set client_key",
        ),
        (
            "wss://127.0.0.1:1/ws/events",
            "redis://127.0.0.1:1/0",
            'client_cert = "{cert}"\nclient_key = "{encrypted}"',
            "",
            "sources[0].client_key: the private key is encrypted",
        ),
        (
            "ws://127.0.0.1:1/ws/events",
            "redis://127.0.0.1:1/0",
            "",
            'ca_file = "{ca}"',
            "redis.ca_file: TLS settings need a rediss:// URL",
        ),
        (
            "ws://127.0.0.1:1/ws/events",
            "rediss://127.0.0.1:1/0?ssl_cert_reqs=none",
            "",
            "",
            "redis.url: no ssl_* options in the URL",
        ),
        (
            "ws://127.0.0.1:1/ws/events",
            "rediss://127.0.0.1:1/0",
            "",
            'client_cert = "{missing}"',
            "redis.client_cert: cannot read",
        ),
    ],
)
def test_tls_settings_are_checked_at_load(
    url: str,
    redis_url: str,
    source_extra: str,
    redis_extra: str,
    message: str,
    tmp_path: Path,
    certs: Certs,
) -> None:
    """Misplaced, unreadable, unusable or incomplete TLS files are ConfigErrors naming the key."""
    names = {
        "ca": str(certs.ca_file),
        "cert": str(certs.client_cert),
        "key": str(certs.client_key),
        "encrypted": str(certs.client_key_encrypted),
        "missing": str(tmp_path / "missing.pem"),
        "token": str(tmp_path / "main.token"),
    }
    path = write_config(
        tmp_path,
        url,
        redis_url,
        source_extra=source_extra.format(**names),
        redis_extra=redis_extra.format(**names),
    )
    with pytest.raises(ConfigError) as info:
        load(path)
    assert message.format(**names) in str(info.value)


def test_redacted_configuration_shows_the_tls_paths(tmp_path: Path, certs: Certs) -> None:
    """check-config's output names the TLS files (paths are not secrets); absent ones are null."""
    config = load(
        write_config(
            tmp_path,
            "wss://127.0.0.1:1/ws/events",
            "rediss://127.0.0.1:1/0",
            source_extra=f'ca_file = "{certs.ca_file}"\nclient_cert = "{certs.client_combined}"',
            redis_extra=f'ca_file = "{certs.ca_file}"',
        )
    )
    shown = config.redacted()
    assert shown["sources"][0]["ca_file"] == str(certs.ca_file)
    assert shown["sources"][0]["client_cert"] == str(certs.client_combined)
    assert shown["sources"][0]["client_key"] is None
    assert shown["redis"]["ca_file"] == str(certs.ca_file)
    assert shown["redis"]["client_cert"] is None


# ---------------------------------------------------------------------------------------------
# The canary


class _Recorder(logging.Handler):
    """Keeps every record as the output would show it (after the redacting filter ran)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "check-config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environ, **(env or {})},
    )


def test_canary_token_appears_nowhere_even_with_debug_logging(
    tmp_path: Path,
    certs: Certs,
    start_simulator: Callable[[ssl.SSLContext], Simulator],
    redis_server: RedisServer,
    redis_client: redis.Redis,
    run_forwarder: Callable[..., Forwarder],
    capfd: pytest.CaptureFixture[str],
) -> None:
    """DEBUG logs, 401s then success, TLS refusals, exceptions, endpoints, check-config: no
    token anywhere."""
    instance = "canary-instance-Zq9"
    canary = mint_token(instance, SECRET)
    signature = canary.split(".")[2]
    setup_logging("DEBUG", sys.stderr)
    recorder = _Recorder()
    logging.getLogger().addHandler(recorder)

    sim = start_simulator(server_context(certs.server))
    sim.reject(count=-1)
    config_path = write_config(
        tmp_path,
        sim.url,
        redis_server.url,
        token=canary,
        source_extra=f'ca_file = "{certs.ca_file}"',
    )
    forwarder = run_forwarder(load(config_path))
    stats = forwarder.stats[0]
    wait_for(lambda: stats.handshake_failures.get("401", 0) >= 2, 10, "two 401s")
    sim.heal()
    wait_for(lambda: connected(forwarder), 10, "connected once the server accepts")
    sim.send(instance, EVENT, 3)
    wait_for(lambda: redis_client.xlen(EVENT) == 3, 10, "3 frames in Redis")
    endpoints = {path: fetch(forwarder, path) for path in ("/metrics", "/status", "/readyz")}

    # Our exceptions, for a rejected and for a TLS-refused handshake, with the token in the URL.
    url = f"{sim.url}?event=call.upsert&token={canary}"
    sim.reject(count=1, instance=instance, event="call.upsert")
    trusted = ssl.create_default_context(cafile=str(certs.ca_file))
    untrusted = ssl.create_default_context(cafile=str(certs.other_ca_file))
    with pytest.raises(HandshakeRejected) as rejected:
        websocket_connect(url, 5.0, ssl_context=trusted)
    with pytest.raises(ConnectFailed) as refused:
        websocket_connect(url, 5.0, ssl_context=untrusted)
    assert "certificate was refused" in str(refused.value)
    exceptions = [
        text
        for exc in (rejected.value, refused.value)
        for text in (str(exc), repr(exc), "".join(traceback.format_exception(exc)))
    ]
    # Anyone's exception carrying the URL, logged with its traceback.
    try:
        raise RuntimeError(f"upstream failed for {url}")
    except RuntimeError:
        logging.getLogger("forwarder.canary").exception("request to %s failed", url)

    checks = {
        "file": check_config("--config", str(config_path)),
        "environment": check_config(
            env={
                "FORWARDER_URL": sim.url,
                "FORWARDER_TOKEN": canary,
                "FORWARDER_REDIS_URL": redis_server.url,
            }
        ),
        "invalid token": check_config(
            env={"FORWARDER_URL": sim.url, "FORWARDER_TOKEN": f"{canary}!"}
        ),
    }
    assert checks["file"].returncode == 0, checks["file"].stderr
    assert str(certs.ca_file) in checks["file"].stdout
    assert checks["environment"].returncode == 0, checks["environment"].stderr
    assert checks["invalid token"].returncode == 2
    assert "not a JWT" in checks["invalid token"].stderr

    forwarder.shutdown()
    out, err = capfd.readouterr()
    assert "token=***" in err  # the URLs in the log were redacted
    assert "HTTP 401" in err
    assert "upstream failed for" in err  # the exception and its traceback were logged
    places = {
        "stdout": out,
        "stderr": err,
        "log records": "\n".join(recorder.lines),
        "exceptions": "\n".join(exceptions),
        **endpoints,
        **{f"check-config ({k})": c.stdout + c.stderr for k, c in checks.items()},
    }
    for where, text in places.items():
        assert canary not in text, where
        assert signature not in text, where
