"""The subscriber without a server: token expiry, make-before-break order, the decoding path.

Connections are socket pairs: the test plays the server on one end, byte for byte.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forwarder.backoff import AttemptLimiter, ReconnectBackoff
from forwarder.config import Backoff, Secret, SourceConfig, Subscription, TokenRef
from forwarder.decode import REASONS, invalid_reason
from forwarder.errors import HandshakeRejected
from forwarder.frames import Opcode
from forwarder.sink import dead_letter_fields, gap_fields
from forwarder.spool import GAP, DiskSpool, Entry, Route
from forwarder.stats import SubscriptionStats
from forwarder.subscriber import (
    EVIDENCE_FRAMES,
    Connection,
    Subscriber,
    _End,
    evidence_window,
)
from forwarder_sim import encode_frame, mint_token
from tests.helpers import wait_for

SECRET = "unit-secret"
ROUTE = Route("main", "messages.upsert", "messages.upsert", "messages.upsert:dlq")


class ListSpool:
    """Keeps what the subscriber appends, in order. Thread-safe enough: one producer."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def append(self, entries: list[Entry], nbytes: int) -> bool:
        self.entries.extend(entries)
        return True

    def pending(self) -> tuple[int, int]:
        return len(self.entries), 0

    def wait_for_writer(self, timeout: float) -> None:
        """No writer here: never holds the reader back."""


class FakeConn:
    """A client socket with the calls the subscriber makes recorded, not sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        self.closes: list[int] = []
        self.pings = 0

    def ping(self, payload: bytes | str = "") -> None:
        self.pings += 1

    def pong(self, payload: bytes | str = "") -> None:
        pass

    def send_close(self, status: int = 1000, reason: bytes = b"") -> None:
        self.closes.append(status)


def source(token: str | None = None, **overrides: object) -> SourceConfig:
    settings_: dict[str, object] = {
        "name": "main",
        "url": "ws://127.0.0.1:9/ws/events",
        "token": TokenRef(value=Secret(token or mint_token("main", SECRET)), origin="unit"),
        "backoff": Backoff(initial=0.01, maximum=0.05, auth_initial=0.05, auth_maximum=0.1),
    }
    settings_.update(overrides)
    return SourceConfig(**settings_)  # type: ignore[arg-type]


def subscriber(src: SourceConfig, spool: ListSpool, connect: object) -> Subscriber:
    sub = Subscription(src, "messages.upsert", "messages.upsert", "messages.upsert:dlq")
    return Subscriber(
        0,
        sub,
        SubscriptionStats(src.name, sub.event, sub.stream),
        cast(DiskSpool, spool),
        AttemptLimiter(1000.0, 100),
        ReconnectBackoff(src.backoff, lambda: 1.0),
        connect,  # type: ignore[arg-type]
    )


@pytest.fixture
def pairs() -> Iterator[list[socket.socket]]:
    """Socket pairs made by a test, closed at its end."""
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def pair(made: list[socket.socket]) -> tuple[socket.socket, socket.socket]:
    client, server = socket.socketpair()
    made += [client, server]
    return client, server


def text(n: int, tag: str) -> bytes:
    return orjson.dumps({"n": n, "tag": tag})


# -- token expiry -----------------------------------------------------------------------------


def test_an_expired_token_is_warned_about_and_named_in_the_401_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 401 with a token whose exp is past: one WARNING, and the ERROR says it expired."""
    caplog.set_level(logging.WARNING)
    token = mint_token("main", SECRET, expires_in=-30)
    attempts = threading.Semaphore(0)

    def reject(url: str, timeout: float) -> Connection:
        attempts.release()
        raise HandshakeRejected(401)

    sub = subscriber(source(token, token_expiry_warning=900.0), ListSpool(), reject)
    sub.start()
    try:
        for _ in range(3):
            assert attempts.acquire(timeout=5)
    finally:
        sub.stop()
        sub.join(5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("expired at" in m for m in warnings) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) >= 3
    assert all("exp claim says it expired" in m for m in errors)
    assert token not in caplog.text


# -- make-before-break ------------------------------------------------------------------------


@pytest.mark.parametrize("in_flight", [True, False])
def test_make_before_break_drains_the_old_connection_before_reading_the_new_one(
    in_flight: bool, pairs: list[socket.socket]
) -> None:
    """Old frames in flight are spooled before the new ones; a silent old one means displaced."""
    spool = ListSpool()
    old_client, old_server = pair(pairs)
    new_client, new_server = pair(pairs)
    conns: list[FakeConn] = []

    def connect(url: str, timeout: float) -> Connection:
        if not conns:
            conn = FakeConn(old_client)
            old_server.sendall(encode_frame(text(1, "old")) + encode_frame(text(2, "old")))
        else:
            conn = FakeConn(new_client)
            # The moment the new connection takes the feed: maybe a frame still in flight on
            # the old one, then its close echo; the new one has frames waiting.
            late = encode_frame(text(3, "old")) if in_flight else b""
            old_server.sendall(late + encode_frame(b"\x03\xe8", 8))
            new_server.sendall(b"".join(encode_frame(text(n, "new")) for n in (4, 5, 6)))
        conns.append(conn)
        return conn

    # silence_timeout 0.5: the evidence window is 0.1 s, the old connection silent for 0.5 s.
    sub = subscriber(source(silence_timeout=0.5, ping_interval=30.0), spool, connect)
    stats = sub._stats
    sub.start()
    expected = [1, 2, 3, 4, 5, 6] if in_flight else [1, 2, 4, 5, 6]
    try:
        wait_for(lambda: stats.received == len(expected), 5.0, "every frame")
    finally:
        sub.stop()
        sub.force_stop()
        sub.join(5)
    frames = [orjson.loads(cast(bytes, e.payload)) for e in spool.entries if e.opcode != GAP]
    assert [f["n"] for f in frames] == expected
    assert conns[0].closes == [1000]  # the old one was closed politely, by us
    assert conns[0].sock is None  # and released
    assert (stats.resubscribes["silence"], stats.reconnects) == (1, 0)
    gaps = [e for e in spool.entries if e.opcode == GAP]
    if in_flight:  # the old connection held the feed until the switch: not displaced
        assert (stats.displacements, gaps) == (0, [])
        return
    assert stats.displacements == 1  # 0.5 s of silence, then 3 frames at once on the new one
    (gap,) = gaps
    record = dict(zip(*[iter(gap_fields(ROUTE, gap))] * 2, strict=True))
    assert record["cause"] == "watchdog"
    assert 400 <= cast(int, record["end"]) - cast(int, record["start"]) < 3000
    assert [e.opcode for e in spool.entries].index(GAP) == 2  # after the old frames


def test_a_failed_resubscribe_keeps_the_current_connection(
    pairs: list[socket.socket],
) -> None:
    """The new connection is refused: the old one stays and keeps delivering."""
    spool = ListSpool()
    client, server = pair(pairs)
    calls: list[int] = []

    def connect(url: str, timeout: float) -> Connection:
        calls.append(1)
        if len(calls) == 1:
            return FakeConn(client)
        raise HandshakeRejected(503)

    sub = subscriber(source(silence_timeout=0.2, ping_interval=30.0), spool, connect)
    sub.start()
    try:
        wait_for(lambda: len(calls) >= 3, 5.0, "two refused re-subscribes")
        server.sendall(encode_frame(text(1, "still")))
        wait_for(lambda: len(spool.entries) == 1, 5.0, "a frame on the old connection")
    finally:
        sub.force_stop()
        sub.join(5)
    assert sub._stats.reconnects == 0
    assert sub._stats.handshake_failures["503"] >= 2
    assert sub._stats.resubscribes["silence"] == 0


# -- the decoding path ------------------------------------------------------------------------


def read_all(data: bytes, max_frame_bytes: int = 1024) -> tuple[_End, list[Entry]]:
    """Feed `data` to a subscriber's read loop as the server, then EOF."""
    client, server = socket.socketpair()
    try:
        spool = ListSpool()
        sub = subscriber(source(max_frame_bytes=max_frame_bytes), spool, None)
        link = sub._register(FakeConn(client))
        server.sendall(data)
        server.shutdown(socket.SHUT_WR)
        result = sub._read(link)
        assert isinstance(result, _End)
        return result, spool.entries
    finally:
        client.close()
        server.close()


def check_routed(entries: list[Entry]) -> None:
    """Every entry is either forwardable as is or a complete dead-letter entry."""
    for entry in entries:
        reason = invalid_reason(entry.opcode, entry.payload)
        if reason is None:
            assert entry.opcode == Opcode.TEXT
            assert isinstance(entry.payload, bytes)
            assert isinstance(orjson.loads(entry.payload), dict | list)
            continue
        assert reason in REASONS
        fields = dict(zip(*[iter(dead_letter_fields(ROUTE, entry, reason, 0))] * 2, strict=True))
        raw = base64.b64decode(cast(bytes, fields["data_base64"]))
        payload = entry.payload
        assert raw == (payload if isinstance(payload, bytes) else payload.head)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_from_the_server_never_raise(data: bytes) -> None:
    """Any byte stream: entries that route cleanly, and an end with a code, never an exception."""
    end, entries = read_all(data)
    assert end.label in {"1006", "1002", "4xxx", "invalid"} or 1000 <= int(end.label) <= 3999
    check_routed(entries)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=2000),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                max_leaves=20,
            ).map(lambda v: json.dumps(v).encode()),
        ),
        max_size=5,
    ),
    st.sampled_from([Opcode.TEXT, Opcode.BINARY]),
)
def test_any_payload_in_a_valid_frame_becomes_an_entry_or_a_dead_letter(
    payloads: list[bytes], opcode: Opcode
) -> None:
    """Well-framed payloads of any content: one entry each, in order, connection not failed."""
    data = b"".join(encode_frame(p, opcode) for p in payloads)
    end, entries = read_all(data)
    assert end.label == "1006"  # our EOF, not a protocol error
    assert len(entries) == len(payloads)
    for entry, payload in zip(entries, payloads, strict=True):
        if len(payload) > 1024:
            assert invalid_reason(entry.opcode, entry.payload) == "too_large"
        else:
            assert entry.payload == payload
    check_routed(entries)


# -- small contracts --------------------------------------------------------------------------


def test_evidence_window_is_a_hundredth_of_the_silence_timeout_within_bounds() -> None:
    """W: 3 s for the 300 s default, never under 0.1 s nor over 30 s; 30 s without watchdog."""
    assert evidence_window(300.0) == 3.0
    assert evidence_window(1.0) == 0.1
    assert evidence_window(86400.0) == 30.0
    assert evidence_window(0.0) == 30.0
    assert EVIDENCE_FRAMES >= 3  # one API send can put two frames on messages.upsert


def test_blind_seconds_never_go_backwards_when_a_gap_closes() -> None:
    """The open interval is read with the reader's clock: closing it must not lower the sum."""
    stats = SubscriptionStats("main", "messages.upsert", "s")
    stats.blind = (5.0, 100.0)
    assert stats.blind_seconds(110.5) == 15.5
    stats.blind = (15.4, None)  # closed with the subscriber's clock, a little earlier
    assert stats.blind_seconds(111.0) == 15.5
    stats.blind = (20.0, None)
    assert stats.blind_seconds(112.0) == 20.0


def test_stop_and_force_stop_before_start_are_harmless(tmp_path: Path) -> None:
    """stop() and force_stop() with no connection return at once; join() with no thread too."""
    sub = subscriber(source(), ListSpool(), None)
    sub.stop()
    sub.force_stop()
    sub.join(0.1)
    assert not sub.is_alive()
