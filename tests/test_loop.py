"""The I/O loop with real sockets: socket pairs play the server, byte for byte, and the real
simulator serves wss:// for the TLS path.

One loop thread multiplexes many subscriptions through one read buffer; frames reach the
spool complete and in order per subscription; a slow handshake never stalls reads; a protocol
violation keeps the frames before it; shutdown closes politely (plain and TLS); a crashing
subscription stops alone.
"""

from __future__ import annotations

import random
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import orjson
import pytest
import trustme

from forwarder.actions import SYSTEM_CLOCK
from forwarder.backoff import AttemptLimiter, ReconnectBackoff
from forwarder.config import Backoff, Secret, SourceConfig, Subscription, TokenRef
from forwarder.frames import Opcode
from forwarder.handshake import Connection, HandshakePool, websocket_connect
from forwarder.loop import IOLoop
from forwarder.spool import GAP, DiskSpool, Entry
from forwarder.stats import State, SubscriptionStats
from forwarder.subscription import SubscriptionRules
from forwarder_sim import Simulator, encode_frame, mint_token
from tests.helpers import wait_for

SECRET = "unit-secret"
FAST = Backoff(initial=0.01, maximum=0.05, auth_initial=0.05, auth_maximum=0.1)


class ListSpool:
    """Keeps what the loop appends, in order (one producer, the loop thread)."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.chunks = 0

    def append(self, entries: list[Entry], nbytes: int) -> bool:
        self.entries.extend(entries)
        self.chunks += 1
        return True

    def pending(self) -> tuple[int, int]:
        return len(self.entries), 0

    def wait_for_writer(self, timeout: float) -> None:
        """No writer here: never holds the loop back."""

    def frames(self, index: int) -> list[int]:
        return [
            orjson.loads(cast(bytes, e.payload))["n"]
            for e in list(self.entries)
            if e.subscription == index and e.opcode != GAP
        ]


class FakeConn:
    def __init__(self, sock: socket.socket, early: bytes = b"") -> None:
        self.sock: socket.socket | None = sock
        self.early = early


class Servers:
    """The server ends of socket pairs, one per connection the loop asks for, by event."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_event: dict[str, list[socket.socket]] = {}
        self.made: list[socket.socket] = []
        self.hold: dict[str, threading.Event] = {}  # events whose handshakes wait for a set()
        self.early: dict[str, bytes] = {}  # bytes the handshake read past the 101, by event

    def connect(self, url: str, timeout: float) -> Connection:
        event = url.split("event=")[1].split("&", maxsplit=1)[0]
        gate = self.hold.get(event)
        if gate is not None:
            gate.wait(10.0)
        client, server = socket.socketpair()
        server.settimeout(5.0)
        with self.lock:
            self.made += [client, server]
            self.by_event.setdefault(event, []).append(server)
        return FakeConn(client, self.early.get(event, b""))

    def server(self, event: str, n: int = 0) -> socket.socket:
        wait_for(lambda: len(self.by_event.get(event, [])) > n, 5.0, f"connection {n} of {event}")
        return self.by_event[event][n]

    def close(self) -> None:
        for s in self.made:
            s.close()


def read_client_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One masked frame from the client, or (-1, b"") at EOF."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    try:
        b0, b1 = exactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(exactly(2), "big")
        mask = exactly(4)
        body = exactly(n)
    except EOFError:
        return -1, b""
    return b0 & 0x0F, bytes(c ^ mask[i % 4] for i, c in enumerate(body))


def text(n: int) -> bytes:
    return orjson.dumps({"n": n, "pad": "x" * (n % 50)})


def make_source(url: str = "ws://127.0.0.1:9/ws/events", **overrides: object) -> SourceConfig:
    settings: dict[str, object] = {
        "name": "main",
        "url": url,
        "token": TokenRef(value=Secret(mint_token("main", SECRET)), origin="unit"),
        "backoff": FAST,
        "ping_interval": 3600.0,
    }
    settings.update(overrides)
    return SourceConfig(**settings)  # type: ignore[arg-type]


class Rig:
    """One IOLoop with a handshake pool, a list spool and subscriptions added on demand."""

    def __init__(
        self,
        connect: Callable[[str, float], Connection],
        workers: int = 2,
        read_bytes: int = 256 * 1024,
    ) -> None:
        self.spool = ListSpool()
        self.pool = HandshakePool(workers, AttemptLimiter(10_000.0, 1000), connect)
        self.loop = IOLoop(
            "io-test", cast(DiskSpool, self.spool), self.pool, SYSTEM_CLOCK.monotonic, read_bytes
        )
        self.rules: list[SubscriptionRules] = []
        self.pool.start()
        self.loop.start()

    def add(
        self,
        event: str,
        src: SourceConfig | None = None,
        cls: type[SubscriptionRules] = SubscriptionRules,
    ) -> SubscriptionRules:
        src = src or make_source()
        sub = Subscription(src, event, event, f"{event}:dlq")
        rules = cls(
            len(self.rules),
            sub,
            SubscriptionStats(src.name, event, event),
            ReconnectBackoff(src.backoff, lambda: 1.0),
            self.loop.outbox,
        )
        self.rules.append(rules)
        self.loop.add(rules)
        return rules

    def close(self) -> None:
        self.loop.force()
        self.loop.join(5.0)
        self.pool.stop()
        self.pool.join(1.0)


@pytest.fixture
def servers() -> Iterator[Servers]:
    made = Servers()
    yield made
    for gate in made.hold.values():
        gate.set()
    made.close()


@pytest.fixture
def rig(servers: Servers) -> Iterator[Rig]:
    made = Rig(servers.connect)
    yield made
    made.close()


EVENTS = [f"e{n}" for n in range(40)]


def test_many_subscriptions_on_one_loop_get_every_frame_in_order(
    rig: Rig, servers: Servers
) -> None:
    """40 connections, 300 frames each, written in random cuts and interleaved: each
    subscription's frames arrive complete, once, in order, through the one shared buffer."""
    for event in EVENTS:
        rig.add(event)
    streams = {e: b"".join(encode_frame(text(n)) for n in range(300)) for e in EVENTS}
    rng = random.Random(5)
    offsets = dict.fromkeys(EVENTS, 0)
    socks = {e: servers.server(e) for e in EVENTS}
    while any(offsets[e] < len(streams[e]) for e in EVENTS):
        event = rng.choice(EVENTS)
        start = offsets[event]
        end = min(len(streams[event]), start + rng.randint(1, 5000))
        socks[event].sendall(streams[event][start:end])
        offsets[event] = end
    wait_for(lambda: len(rig.spool.entries) == 40 * 300, 20.0, "every frame")
    for index in range(40):
        assert rig.spool.frames(index) == list(range(300))
    assert all(r.stats.state is State.CONNECTED for r in rig.rules)


def test_the_frames_read_with_the_upgrade_come_first_and_in_order(
    rig: Rig, servers: Servers
) -> None:
    """Frames that arrived in the same read as the 101 (the handshake read past its headers)
    are spooled before what the socket brings next, the first one cut in two between them."""
    first = b"".join(encode_frame(text(n)) for n in range(5))
    servers.early["messages.upsert"] = first[:-3]
    rig.add("messages.upsert")
    server = servers.server("messages.upsert")
    server.sendall(first[-3:] + b"".join(encode_frame(text(n)) for n in range(5, 10)))
    wait_for(lambda: len(rig.spool.entries) == 10, 5.0, "every frame")
    assert rig.spool.frames(0) == list(range(10))


def test_frames_before_a_violation_are_spooled_and_the_client_closes_with_1002(
    rig: Rig, servers: Servers
) -> None:
    """Three frames and an RSV1 frame in one write: the three are spooled; the server gets our
    close 1002 and then EOF; the subscription reconnects."""
    rules = rig.add("messages.upsert")
    server = servers.server("messages.upsert")
    server.sendall(b"".join(encode_frame(text(n)) for n in range(3)) + bytes([0xC1, 2]) + b"{}")
    assert read_client_frame(server) == (Opcode.CLOSE, (1002).to_bytes(2, "big"))
    assert read_client_frame(server) == (-1, b"")
    wait_for(lambda: rig.spool.frames(0) == [0, 1, 2], 5.0, "the three frames")
    servers.server("messages.upsert", 1)  # reconnected
    wait_for(lambda: rules.stats.close_codes.get("1002") == 1, 5.0, "1002 counted")


def test_shutdown_closes_politely_and_spools_the_frames_sent_before_the_echo(
    rig: Rig, servers: Servers
) -> None:
    """shutdown(): the server reads our 1001, writes two more frames and the echo: both frames
    are spooled and the loop thread ends."""
    rules = rig.add("messages.upsert")
    server = servers.server("messages.upsert")
    server.sendall(encode_frame(text(0)))
    wait_for(lambda: rig.spool.frames(0) == [0], 5.0, "the first frame")
    rig.loop.shutdown()
    assert read_client_frame(server) == (Opcode.CLOSE, (1001).to_bytes(2, "big"))
    server.sendall(encode_frame(text(1)) + encode_frame(text(2)) + encode_frame(b"\x03\xe9", 8))
    rig.loop.join(5.0)
    assert not rig.loop.is_alive()
    assert rig.spool.frames(0) == [0, 1, 2]
    assert rules.finished
    assert rules.stats.state is State.STOPPED


def test_shutdown_ends_without_an_echo_and_force_cuts_at_once(rig: Rig, servers: Servers) -> None:
    """A server that never echoes: the loop still ends (close-echo timeout); force() is faster."""
    rig.add("messages.upsert")
    server = servers.server("messages.upsert")
    rig.loop.shutdown()
    assert read_client_frame(server)[0] == Opcode.CLOSE
    rig.loop.join(10.0)
    assert not rig.loop.is_alive()
    assert read_client_frame(server) == (-1, b"")


def test_a_slow_handshake_never_stalls_the_reads_of_other_connections(
    rig: Rig, servers: Servers
) -> None:
    """One subscription's server hangs in the handshake; another's frames keep arriving."""
    servers.hold["call.upsert"] = threading.Event()
    rig.add("messages.upsert")
    slow = rig.add("call.upsert")
    server = servers.server("messages.upsert")
    for n in range(50):
        server.sendall(encode_frame(text(n)))
    wait_for(lambda: rig.spool.frames(0) == list(range(50)), 5.0, "frames while one hangs")
    assert slow.stats.state is State.CONNECTING
    servers.hold["call.upsert"].set()
    servers.server("call.upsert")
    wait_for(lambda: slow.stats.state is State.CONNECTED, 5.0, "the slow one connected")


class Crashing(SubscriptionRules):
    """A bug: reading raises."""

    def received(self, link_id: int, data: bytes) -> None:
        raise RuntimeError("a bug in the rules")


def test_a_subscription_that_raises_stops_alone(
    rig: Rig, servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in one subscription's rules stops it (failed, logged); the loop and the other
    subscriptions go on."""
    bad = rig.add("call.upsert", cls=Crashing)
    rig.add("messages.upsert")
    servers.server("call.upsert").sendall(encode_frame(text(0)))
    wait_for(lambda: bad.failed is not None, 5.0, "the crash recorded")
    assert bad.stats.state is State.STOPPED
    assert "subscription crashed" in caplog.text
    servers.server("messages.upsert").sendall(encode_frame(text(1)))
    wait_for(lambda: rig.spool.frames(1) == [1], 5.0, "the other one still read")
    assert rig.loop.is_alive()
    assert rig.loop.failed is None


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, str]:
    """A test CA (PEM file) and the CA object to issue the server's certificate."""
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, str(path)


@pytest.fixture
def wss_simulator(tls_files: tuple[trustme.CA, str]) -> Iterator[Simulator]:
    ca, _ = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    sim = Simulator(secret=SECRET, record=True, ssl_context=context)
    sim.start()
    yield sim
    sim.stop()


@pytest.mark.parametrize("read_bytes", [256 * 1024, 1000])
def test_wss_frames_flow_through_the_loop_and_shutdown_is_a_polite_close(
    read_bytes: int, wss_simulator: Simulator, tls_files: tuple[trustme.CA, str]
) -> None:
    """wss:// through the non-blocking TLS path: large frames arrive whole and in order (also
    when a read buffer smaller than a TLS record leaves bytes inside OpenSSL, which the
    selector cannot see); at shutdown the server receives our 1001 close frame, and frames
    it sent first are spooled."""
    sim = wss_simulator
    rig = Rig(websocket_connect, read_bytes=read_bytes)
    try:
        src = make_source(sim.url, ca_file=Path(tls_files[1]))
        rules = rig.add("messages.upsert", src)
        wait_for(lambda: rules.stats.state is State.CONNECTED, 10.0, "connected over TLS")
        sim.send("main", "messages.upsert", 200, size=20_000)  # records span TLS records
        wait_for(lambda: len(rig.spool.entries) == 200, 10.0, "200 frames over TLS")
        assert [e.payload for e in rig.spool.entries] == sim.delivered_frames(
            "main", "messages.upsert"
        )
        sim.send("main", "messages.upsert", 5)
        rig.loop.shutdown()
        rig.loop.join(10.0)
        assert not rig.loop.is_alive()
    finally:
        rig.close()
    slot = sim.stats()["slots"]["main"]["messages.upsert"]
    assert slot["client_closes"] == {"1001": 1}
    assert [e.payload for e in rig.spool.entries] == sim.delivered_frames("main", "messages.upsert")
    assert rules.finished
