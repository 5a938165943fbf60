"""The upstream simulator over real loopback sockets, with websocket-client as the client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import websocket

from forwarder_sim import DEV_SECRET, REJECT_RESPONSE, Simulator, main, mint_token, payloads
from forwarder_sim.tokens import JWT_CODEC

SECRET = "simulator-test-secret"  # short on purpose: upstream secrets can be short too
INSTANCE = "acme"
EVENT = "messages.upsert"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3 example key
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A recording simulator that checks token expiry."""
    with Simulator(SECRET, record=True, ignore_expiration=False) as s:
        yield s


def connect(sim: Simulator, instance: str = INSTANCE, event: str = EVENT) -> websocket.WebSocket:
    """Open a websocket-client connection and wait until the simulator made it the holder."""
    before = sim.stats()["slots"].get(instance, {}).get(event, {}).get("connections", 0)
    ws = websocket.create_connection(
        sim.url_for(instance, event), timeout=5, skip_utf8_validation=True
    )
    sim.wait_for_holder(instance, event, connections=before + 1)
    return ws


def recv_bytes(ws: websocket.WebSocket) -> bytes:
    """The next data frame's payload as bytes (recv() would decode text frames)."""
    return ws.recv_data()[1]  # type: ignore[no-any-return]


def recv_seqs(ws: websocket.WebSocket, n: int, event: str = EVENT) -> list[int]:
    return [payloads.seq_of(event, recv_bytes(ws)) for _ in range(n)]


def raw_request(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until EOF, return everything received."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def upgrade_request(target: str, extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
        f"Upgrade: websocket\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()


def query(event: str | None, token: str | None) -> str:
    params = {k: v for k, v in (("event", event), ("token", token)) if v is not None}
    return urllib.parse.urlencode(params)


def http_json(sim: Simulator, path: str, body: Any = None) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{sim.port}{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            assert resp.headers["Content-Type"] == "application/json"
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def slot_stats(sim: Simulator, instance: str = INSTANCE, event: str = EVENT) -> dict[str, Any]:
    return sim.stats()["slots"][instance][event]  # type: ignore[no-any-return]


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    """Read one server frame from a raw socket: (first byte, second byte, payload)."""

    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "EOF inside a frame"
            buf += chunk
        return buf

    b0, b1 = exact(2)
    length = b1 & 0x7F
    if length == 126:
        length = struct.unpack("!H", exact(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", exact(8))[0]
    return b0, b1, exact(length)


def read_until_error(ws: websocket.WebSocket) -> list[bytes]:
    """Read data frames until the connection fails (RST or EOF); the failure is required."""
    frames: list[bytes] = []
    for _ in range(100_000):
        try:
            frames.append(recv_bytes(ws))
        except (ConnectionResetError, websocket.WebSocketException):
            return frames
    raise AssertionError("connection never failed")


def read_until_timeout(sock: socket.socket) -> bytes:
    """Read raw bytes until the socket's timeout expires (the timeout is required)."""
    data = b""
    for _ in range(10_000):
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            return data
        assert chunk, "unexpected EOF"
        data += chunk
    raise AssertionError("never went quiet")


def masked_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask + body


def raw_ws(sim: Simulator, instance: str = INSTANCE, event: str = EVENT) -> socket.socket:
    """A raw socket past a successful upgrade (response headers consumed)."""
    sock = socket.create_connection(("127.0.0.1", sim.port), timeout=5)
    target = f"/ws/events?{query(event, sim.token(instance))}"
    sock.sendall(upgrade_request(target))
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101 ")
    return sock


# --------------------------------------------------------------------------- handshake


def test_upgrade_succeeds_with_minimal_101(sim: Simulator) -> None:
    """A valid upgrade gets 101 with the RFC accept key and no extension or sub-protocol."""
    sock = socket.create_connection(("127.0.0.1", sim.port), timeout=5)
    extra = (
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        "Sec-WebSocket-Protocol: chat\r\nOrigin: http://evil.example\r\n"
    )
    sock.sendall(upgrade_request(f"/ws/events?{query(EVENT, sim.token(INSTANCE))}", extra))
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += sock.recv(1)
    sock.close()
    assert (
        head
        == (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
        ).encode()
    )


def test_websocket_client_connects_and_receives(sim: Simulator) -> None:
    """websocket-client connects with a minted token and receives a sent frame."""
    ws = connect(sim)
    assert sim.send(INSTANCE, EVENT, 1) == 1
    assert payloads.seq_of(EVENT, ws.recv()) == 1
    ws.close()


REJECTIONS = {
    "bad path": lambda t: f"/ws/event?{query(EVENT, t)}",
    "trailing slash": lambda t: f"/ws/events/?{query(EVENT, t)}",
    "other path": lambda t: f"/instance/ws?{query(EVENT, t)}",
    "missing event": lambda t: f"/ws/events?{query(None, t)}",
    "missing token": lambda t: f"/ws/events?{query(EVENT, None)}",
    "empty event": lambda t: f"/ws/events?{query('', t)}",
    "malformed token": lambda t: f"/ws/events?{query(EVENT, 'not-a-jwt')}",
    "global api key": lambda t: f"/ws/events?{query(EVENT, 'B6D711FCDE4D4FD5936544120E713976')}",
    "wrong secret": lambda t: f"/ws/events?{query(EVENT, mint_token(INSTANCE, 'other-secret'))}",
    "expired token": lambda t: (
        f"/ws/events?{query(EVENT, mint_token(INSTANCE, SECRET, expires_in=-60))}"
    ),
    "unknown event": lambda t: f"/ws/events?{query('messages.delete', t)}",
    "case-sensitive event": lambda t: f"/ws/events?{query('MESSAGES.UPSERT', t)}",
    "messaging-history.set": lambda t: f"/ws/events?{query('messaging-history.set', t)}",
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejection_is_bare_401_then_eof(sim: Simulator, case: str) -> None:
    """Every failed check is answered with exactly the bare 401 bytes, then EOF."""
    target = REJECTIONS[case](sim.token(INSTANCE))
    assert raw_request(sim.port, upgrade_request(target)) == REJECT_RESPONSE
    assert sim.stats()["rejected"] == 1


def test_rejection_counted_per_slot_when_known(sim: Simulator) -> None:
    """A badly signed token for a known event is counted on its slot and globally."""
    target = f"/ws/events?{query(EVENT, mint_token(INSTANCE, 'wrong-secret'))}"
    assert raw_request(sim.port, upgrade_request(target)) == REJECT_RESPONSE
    stats = sim.stats()
    assert stats["rejected"] == 1
    assert stats["rejected_by_reason"] == {"signature": 1}
    assert stats["slots"][INSTANCE][EVENT]["rejected"] == 1


def test_websocket_client_sees_401(sim: Simulator) -> None:
    """websocket-client reports the rejection as a bad status 401."""
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"{sim.url}?{query('nope', sim.token(INSTANCE))}", timeout=5)
    assert info.value.status_code == 401


def test_expired_token_accepted_when_ignoring_expiration() -> None:
    """With ignore_expiration (upstream EXPIRES_IN=0) an expired token still connects."""
    with Simulator(SECRET, ignore_expiration=True) as s:
        token = mint_token(INSTANCE, SECRET, expires_in=-3600)
        ws = websocket.create_connection(f"{s.url}?{query(EVENT, token)}", timeout=5)
        ws.close()


def test_every_allowed_event_is_accepted(sim: Simulator) -> None:
    """All 22 ListEvents names upgrade successfully, including the silent ones."""
    for event in payloads.ALLOWED_EVENTS:
        connect(sim, event=event).close()
    assert sim.stats()["rejected"] == 0


def test_mint_token_claims() -> None:
    """mint_token produces upstream's claims, HS256, with exp only when asked."""
    token = mint_token("inst", SECRET, expires_in=60, now=1_700_000_000)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert list(claims) == ["instanceName", "apiName", "tokenId", "iat", "exp", "sub"]
    assert claims["instanceName"] == "inst"
    assert claims["apiName"] == "whatsapp-api"
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", claims["tokenId"])
    assert claims["exp"] - claims["iat"] == 60
    assert claims["sub"] == "g-t"
    assert "exp" not in jwt.decode(mint_token("i", SECRET), options={"verify_signature": False})


# --------------------------------------------------------------------------- slots


def test_newest_connection_wins_silently(sim: Simulator) -> None:
    """A second connection takes the slot; the first stays open, answers pings, gets nothing."""
    old = connect(sim)
    new = connect(sim)
    assert sim.send(INSTANCE, EVENT, 5) == 5
    assert recv_seqs(new, 5) == [1, 2, 3, 4, 5]
    old.ping(b"still-there")
    assert old.recv_data(control_frame=True) == (websocket.ABNF.OPCODE_PONG, b"still-there")
    old.settimeout(0.3)
    with pytest.raises(websocket.WebSocketTimeoutException):
        old.recv()
    assert old.connected
    stats = sim.stats()
    slot = stats["slots"][INSTANCE][EVENT]
    assert slot["connections"] == 2
    assert stats["connections"][str(slot["holder"])]["delivered"] == 5
    assert sum(c["delivered"] for c in stats["connections"].values()) == 5
    old.close()
    new.close()


def test_dead_holder_drops_frames_until_new_connection(sim: Simulator) -> None:
    """After the holder disconnects frames are dropped and counted; a new holder gets the rest."""
    displaced = connect(sim)
    holder = connect(sim)
    holder.close()
    wait_until(lambda: not slot_stats(sim)["holder_open"])
    assert sim.send(INSTANCE, EVENT, 10) == 0
    displaced.settimeout(0.3)
    with pytest.raises(websocket.WebSocketTimeoutException):
        displaced.recv()  # the displaced socket is not given the slot back
    slot = slot_stats(sim)
    assert (slot["delivered"], slot["dropped"], slot["seq"]) == (0, 10, 10)
    fresh = connect(sim)
    assert sim.send(INSTANCE, EVENT, 3) == 3
    assert recv_seqs(fresh, 3) == [11, 12, 13]  # the gap 1..10 is visible to the client
    displaced.close()
    fresh.close()


def test_send_delivers_exact_count_in_order_and_records(sim: Simulator) -> None:
    """send(count) delivers exactly count frames with consecutive seqs, recorded byte for byte."""
    ws = connect(sim)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(recv_bytes(ws) for _ in range(3000)))
    reader.start()
    assert sim.send(INSTANCE, EVENT, 3000) == 3000
    reader.join(20)
    assert [payloads.seq_of(EVENT, g) for g in got] == list(range(1, 3001))
    assert sim.delivered_frames(INSTANCE, EVENT) == got
    assert slot_stats(sim)["delivered"] == 3000
    ws.close()


@pytest.mark.parametrize("event", payloads.SENT_EVENTS)
def test_each_sent_event_round_trips(sim: Simulator, event: str) -> None:
    """Frames of every sent event arrive as the JSON built by payloads, with the instance name."""
    ws = connect(sim, event=event)
    sim.send(INSTANCE, event, 4)
    frames = [recv_bytes(ws) for _ in range(4)]
    assert frames == [payloads.build(event, s, 0, INSTANCE) for s in range(1, 5)]
    ws.close()


def test_slots_are_independent(sim: Simulator) -> None:
    """Each (instance, event) has its own holder and its own seq counter."""
    a = connect(sim, "a", EVENT)
    b = connect(sim, "b", EVENT)
    c = connect(sim, "a", "send.message")
    sim.send("a", EVENT, 2)
    sim.send("b", EVENT, 1)
    sim.send("a", "send.message", 1)
    assert recv_seqs(a, 2) == [1, 2]
    assert recv_seqs(b, 1) == [1]
    assert recv_seqs(c, 1, "send.message") == [1]
    for ws in (a, b, c):
        ws.close()


# --------------------------------------------------------------------------- framing


def test_frame_encoding_lengths(sim: Simulator) -> None:
    """Server frames are FIN text frames, unmasked, using 7-, 16- and 64-bit lengths."""
    sock = raw_ws(sim)
    sim.wait_for_holder(INSTANCE, EVENT)
    for size in (10, 125, 126, 300, 65535, 65536, 70000):
        body = payloads.sized(EVENT, size, max(size, payloads.min_size(EVENT)))[:size]
        assert sim.send_raw(INSTANCE, EVENT, body)
        b0, b1, payload = read_frame(sock)
        assert b0 == 0x81
        assert not b1 & 0x80
        assert (b1 & 0x7F) == (size if size < 126 else 126 if size < 65536 else 127)
        assert payload == body
    sock.close()


def test_client_close_is_echoed_then_tcp_closed(sim: Simulator) -> None:
    """A client close frame is echoed with the same code and reason, then EOF."""
    sock = raw_ws(sim)
    sim.wait_for_holder(INSTANCE, EVENT)
    sock.sendall(masked_frame(8, struct.pack("!H", 1001) + b"bye"))
    assert read_frame(sock) == (0x88, 5, struct.pack("!H", 1001) + b"bye")
    assert sock.recv(10) == b""
    sock.close()


def test_client_data_frames_are_ignored(sim: Simulator) -> None:
    """Text, binary and fragmented client messages are ignored; pings in between get pongs."""
    sock = raw_ws(sim)
    sim.wait_for_holder(INSTANCE, EVENT)
    sock.sendall(masked_frame(1, b'{"message":"test data"}'))
    sock.sendall(masked_frame(2, b"\x00\x01"))
    sock.sendall(masked_frame(1, b"part1", fin=False))
    sock.sendall(masked_frame(9, b"mid"))
    sock.sendall(masked_frame(0, b"part2", fin=True))
    assert read_frame(sock) == (0x8A, 3, b"mid")
    sim.send(INSTANCE, EVENT, 1)
    b0, _, payload = read_frame(sock)
    assert (b0, payload) == (0x81, payloads.build(EVENT, 1, 0, INSTANCE))
    sock.close()


def test_unmasked_client_frame_is_a_protocol_error(sim: Simulator) -> None:
    """An unmasked client frame gets a 1002 close frame and the connection is closed."""
    sock = raw_ws(sim)
    sim.wait_for_holder(INSTANCE, EVENT)
    sock.sendall(b"\x89\x00")
    assert read_frame(sock) == (0x88, 2, struct.pack("!H", 1002))
    assert sock.recv(10) == b""
    sock.close()


# --------------------------------------------------------------------------- HTTP


def test_stats_and_control_over_http(sim: Simulator) -> None:
    """GET /stats returns JSON stats; POST /control/send sends; bad requests get 400/404."""
    ws = connect(sim)
    status, body = http_json(
        sim, "/control/send", {"instance": INSTANCE, "event": EVENT, "count": 2}
    )
    assert (status, body) == (200, {"ok": True, "delivered": 2, "dropped": 0, "last_seq": 2})
    assert recv_seqs(ws, 2) == [1, 2]
    status, stats = http_json(sim, "/stats")
    assert status == 200
    assert stats["slots"][INSTANCE][EVENT]["delivered"] == 2
    assert stats == json.loads(
        json.dumps(sim.stats() | {"uptime_seconds": stats["uptime_seconds"]})
    )
    assert http_json(sim, "/control/nonsense", {})[0] == 404
    assert http_json(sim, "/control/drop", {"bogus": 1})[0] == 400
    assert http_json(sim, "/control/set_rate", {"event": "nope", "rate": 1})[0] == 400
    ws.close()


def test_stats_shape(sim: Simulator) -> None:
    """stats() is JSON-serialisable and has the documented keys."""
    ws = connect(sim)
    stats = sim.stats()
    orjson.dumps(stats)
    assert {"rejected", "rejected_by_reason", "slots", "connections", "delivered"} <= set(stats)
    slot = stats["slots"][INSTANCE][EVENT]
    assert {"delivered", "dropped", "connections", "rejected", "holder", "injected"} <= set(slot)
    conn = stats["connections"][str(slot["holder"])]
    assert conn["open"] is True
    assert conn["delivered"] == 0
    ws.close()


# --------------------------------------------------------------------------- faults


def test_drop_flushes_then_fin_without_close_frame(sim: Simulator) -> None:
    """drop: every delivered frame arrives, then the TCP closes with no close frame (1006)."""
    ws = connect(sim)
    assert sim.send(INSTANCE, EVENT, 500) == 500
    assert sim.drop(INSTANCE, EVENT) == 1
    assert recv_seqs(ws, 500) == list(range(1, 501))
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        ws.recv_data(control_frame=True)  # EOF, not a close frame
    assert sim.send(INSTANCE, EVENT, 1) == 0
    ws.close()


def test_close_sends_close_frame_with_code(sim: Simulator) -> None:
    """close: a close frame with the given code and reason, then the connection ends."""
    ws = connect(sim)
    assert sim.close(INSTANCE, EVENT, code=4001, reason="bye") == 1
    opcode, payload = ws.recv_data(control_frame=True)
    assert (opcode, payload) == (websocket.ABNF.OPCODE_CLOSE, struct.pack("!H", 4001) + b"bye")
    ws.close()


def test_reset_after_flush_keeps_delivered_exact(sim: Simulator) -> None:
    """reset: frames the client read before the RST match the delivered count exactly."""
    ws = connect(sim)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(read_until_error(ws)))
    reader.start()
    sim.send(INSTANCE, EVENT, 300)
    assert sim.reset(INSTANCE, EVENT) == 1
    reader.join(10)
    slot = slot_stats(sim)
    assert slot["delivered"] == len(got) == 300
    assert slot["reset_lost"] == 0


def test_reset_uncounts_frames_a_stuck_client_never_got(sim: Simulator) -> None:
    """reset with a client that does not read: destroyed frames move from delivered to dropped."""
    ws = connect(sim)
    sender = threading.Thread(target=sim.send, args=(INSTANCE, EVENT, 5000), daemon=True)
    sender.start()
    wait_until(lambda: slot_stats(sim)["delivered"] > 100)
    sim.reset(INSTANCE, EVENT, flush_timeout=0.2)
    sender.join(10)
    got = [payloads.seq_of(EVENT, f) for f in read_until_error(ws)]
    slot = slot_stats(sim)
    assert slot["reset_lost"] > 0
    assert got == list(range(1, slot["delivered"] + 1))
    assert slot["delivered"] + slot["dropped"] == 5000
    recorded = sim.delivered_frames(INSTANCE, EVENT)
    assert [payloads.seq_of(EVENT, f) for f in recorded] == got


def test_blackhole_and_heal(sim: Simulator) -> None:
    """blackhole: no frames, no pongs, TCP open; heal: late pong, frames flow again."""
    ws = connect(sim)
    assert sim.blackhole(INSTANCE, EVENT) == 1
    ws.ping(b"p1")
    assert sim.send(INSTANCE, EVENT, 5) == 0
    ws.settimeout(0.3)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws.recv_data(control_frame=True)
    assert slot_stats(sim)["dropped"] == 5
    assert sim.heal(INSTANCE, EVENT) == 1
    ws.settimeout(5)
    assert ws.recv_data(control_frame=True) == (websocket.ABNF.OPCODE_PONG, b"p1")
    sim.send(INSTANCE, EVENT, 2)
    assert recv_seqs(ws, 2) == [6, 7]
    ws.close()


def test_stall_mid_frame(sim: Simulator) -> None:
    """stall_mid_frame: a header announcing N bytes plus a few, then silence (no pongs)."""
    sock = raw_ws(sim)
    sim.wait_for_holder(INSTANCE, EVENT)
    assert sim.stall_mid_frame(INSTANCE, EVENT, length=1 << 20, sent=16) == 1
    sock.settimeout(0.3)
    head = sock.recv(4)
    assert head == b"\x81\x7f\x00\x00"
    rest = read_until_timeout(sock)
    assert len(rest) == 8 - 2 + 16  # the remaining length bytes plus 16 payload bytes
    assert struct.unpack("!Q", head[2:] + rest[:6])[0] == 1 << 20
    sock.sendall(masked_frame(9, b"ping"))
    with pytest.raises(TimeoutError):
        sock.recv(10)
    assert sim.send(INSTANCE, EVENT, 3) == 0
    assert slot_stats(sim)["injected"] == {"stall_mid_frame": 1}
    sock.close()


@pytest.mark.parametrize(
    ("kind", "opcode", "check"),
    [
        ("invalid_json", websocket.ABNF.OPCODE_TEXT, "bad_json"),
        ("binary", websocket.ABNF.OPCODE_BINARY, "json"),
        ("invalid_utf8", websocket.ABNF.OPCODE_TEXT, "bad_utf8"),
    ],
)
def test_bad_frame_injection(sim: Simulator, kind: str, opcode: int, check: str) -> None:
    """Injected bad frames arrive as described, are counted as injected, not as delivered."""
    ws = connect(sim)
    assert getattr(sim, kind)(INSTANCE, EVENT, count=2) == 2
    for _ in range(2):
        got_opcode, data = ws.recv_data()
        assert got_opcode == opcode
        if check == "bad_json":
            data.decode("utf-8")
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(data)
        elif check == "bad_utf8":
            with pytest.raises(UnicodeDecodeError):
                data.decode("utf-8")
        else:
            orjson.loads(data)
    slot = slot_stats(sim)
    assert slot["injected"] == {kind: 2}
    assert slot["delivered"] == 0
    sim.send(INSTANCE, EVENT, 1)
    assert recv_seqs(ws, 1) == [1]  # the stream is still usable and seqs are unaffected
    ws.close()


def test_oversized_deep_json_and_huge_int(sim: Simulator) -> None:
    """oversized streams a valid JSON text frame of exactly N bytes; deep/huge JSON as asked."""
    ws = connect(sim)
    size = 3 * 1024 * 1024 + 7
    result: list[int] = []
    writer = threading.Thread(target=lambda: result.append(sim.oversized(INSTANCE, EVENT, size)))
    writer.start()
    opcode, data = ws.recv_data()
    writer.join(10)
    assert result == [1]
    assert opcode == websocket.ABNF.OPCODE_TEXT
    assert len(data) == size
    assert orjson.loads(data)["content"]["text"].startswith("x")
    assert sim.deep_json(INSTANCE, EVENT, depth=5000) == 1
    assert ws.recv_data()[1] == b"[" * 5000 + b"]" * 5000
    assert sim.huge_int(INSTANCE, EVENT, digits=5000) == 1
    assert ws.recv_data()[1] == b'{"messageTimestamp":' + b"9" * 5000 + b"}"
    assert slot_stats(sim)["injected"] == {"oversized": 1, "deep_json": 1, "huge_int": 1}
    ws.close()


def test_reject_next_n_then_always_until_heal(sim: Simulator) -> None:
    """reject(n) answers the next n valid upgrades with 401; reject(-1) lasts until heal."""
    target = f"/ws/events?{query(EVENT, sim.token(INSTANCE))}"
    sim.reject(2)
    assert raw_request(sim.port, upgrade_request(target)) == REJECT_RESPONSE
    assert raw_request(sim.port, upgrade_request(target)) == REJECT_RESPONSE
    connect(sim).close()
    sim.reject(-1, instance=INSTANCE)
    for _ in range(3):
        assert raw_request(sim.port, upgrade_request(target)) == REJECT_RESPONSE
    connect(sim, instance="other").close()  # out of the rule's scope
    sim.heal()
    connect(sim).close()
    stats = sim.stats()
    assert stats["rejected_by_reason"] == {"fault": 5}
    assert stats["slots"][INSTANCE][EVENT]["rejected"] == 5


def test_faults_over_http(sim: Simulator) -> None:
    """POST /control/<name> runs the fault with the JSON body's parameters."""
    ws = connect(sim)
    body = {"instance": INSTANCE, "event": EVENT}
    assert http_json(sim, "/control/invalid_json", body) == (200, {"ok": True, "frames": 1})
    assert ws.recv_data()[1].startswith(b'{"keyId"')
    status, result = http_json(sim, "/control/send_raw", {**body, "payload": '{"a":1}'})
    assert (status, result) == (200, {"ok": True, "written": True})
    assert ws.recv() == '{"a":1}'
    assert http_json(sim, "/control/close", {**body, "code": 4003, "reason": "x"})[0] == 200
    assert ws.recv_data(control_frame=True)[1] == struct.pack("!H", 4003) + b"x"
    assert http_json(sim, "/control/reject", {"count": 1}) == (200, {"ok": True, "rules": 1})
    assert http_json(sim, "/control/heal", {}) == (200, {"ok": True, "connections": 0})
    ws.close()


# --------------------------------------------------------------------------- REST: instances

API_KEY = "sim-test-global-key"
LISTING = "/instance/fetchInstances"


def api(
    sim: Simulator,
    path: str = LISTING,
    key: str | None = API_KEY,
    method: str = "GET",
    body: Any = None,
) -> tuple[int, Any]:
    """One REST request the way a client of the upstream makes it; (status, parsed body)."""
    headers = {} if key is None else {"apikey": key}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{sim.port}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def rest() -> Iterator[Simulator]:
    """A simulator with a known global key and two instances listed from the start."""
    with Simulator(SECRET, api_key=API_KEY, instances=["acme", "beta"]) as s:
        yield s


def test_listing_has_the_upstream_shape_with_the_instance_tokens(rest: Simulator) -> None:
    """fetchInstances answers an array of database rows; Auth.token is a working WS token."""
    status, rows = api(rest)
    assert status == 200
    assert [r["name"] for r in rows] == ["acme", "beta"]
    for row in rows:
        assert set(row) == {
            "id",
            "name",
            "description",
            "connectionStatus",
            "ownerJid",
            "profilePicUrl",
            "createdAt",
            "updatedAt",
            "Auth",
            "Webhook",
        }
        assert set(row["Auth"]) == {"id", "token", "createdAt", "updatedAt"}
        assert row["connectionStatus"] in ("ONLINE", "OFFLINE")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", row["createdAt"])
        claims = JWT_CODEC.decode(row["Auth"]["token"], SECRET, algorithms=["HS256"])
        assert claims["instanceName"] == row["name"]
    query = urllib.parse.urlencode({"event": EVENT, "token": rows[0]["Auth"]["token"]})
    ws = websocket.create_connection(f"{rest.url}?{query}", timeout=5)
    rest.wait_for_holder("acme", EVENT)
    assert rest.send("acme", EVENT, 1) == 1
    ws.close()


def test_listing_checks_the_global_key_like_upstream(rest: Simulator) -> None:
    """No apikey header: 403; a wrong key (even an instance token): 401; nothing listed."""
    status, body = api(rest, key=None)
    assert status == 403
    assert body["message"] == ["Missing global api key"]
    assert api(rest, key="wrong")[0] == 401
    assert api(rest, key=rest.instance_token("acme"))[0] == 401
    assert rest.stats()["api"]["requests"] == {"403": 1, "401": 2}
    assert rest.stats()["api"]["listings"] == 0


def test_listing_by_instance_name_is_still_an_array(rest: Simulator) -> None:
    """?instanceName=NAME answers a one-element array; an unknown name is a 400."""
    status, rows = api(rest, f"{LISTING}?instanceName=beta")
    assert status == 200
    assert [r["name"] for r in rows] == ["beta"]
    assert api(rest, f"{LISTING}?instanceName=nobody")[0] == 400


def test_instances_created_deleted_and_rotated_at_run_time(rest: Simulator) -> None:
    """Control endpoints change the listing; a deleted instance's token still connects."""
    status, result = http_json(rest, "/control/create_instance", {"name": "gamma"})
    assert status == 200
    assert result["name"] == "gamma"
    assert [r["name"] for r in api(rest)[1]] == ["acme", "beta", "gamma"]
    assert http_json(rest, "/control/create_instance", {"name": "gamma"})[0] == 400
    old = rest.instance_token("gamma")
    status, auth = http_json(rest, "/control/rotate_token", {"name": "gamma"})
    assert status == 200
    assert auth["token"] != old
    assert {r["name"]: r["Auth"]["token"] for r in api(rest)[1]}["gamma"] == auth["token"]
    assert http_json(rest, "/control/delete_instance", {"name": "beta"})[0] == 200
    assert [r["name"] for r in api(rest)[1]] == ["acme", "gamma"]
    assert http_json(rest, "/control/delete_instance", {"name": "beta"})[0] == 400
    # The WebSocket check is only cryptographic: the old token of a rotated instance and a
    # deleted instance's token still connect (and then receive nothing).
    for name, token in (("gamma", old), ("beta", rest.token("beta"))):
        query = urllib.parse.urlencode({"event": EVENT, "token": token})
        ws = websocket.create_connection(f"{rest.url}?{query}", timeout=5)
        rest.wait_for_holder(name, EVENT)
        ws.close()


def test_connections_record_which_token_they_used(rest: Simulator) -> None:
    """Each connection's stats carry the tokenId of its token: tests see which one was used."""
    token = rest.instance_token("acme")
    query = urllib.parse.urlencode({"event": EVENT, "token": token})
    ws = websocket.create_connection(f"{rest.url}?{query}", timeout=5)
    holder = rest.wait_for_holder("acme", EVENT)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert rest.stats()["connections"][str(holder)]["token_id"] == claims["tokenId"]
    ws.close()


def test_deleting_an_instance_stops_its_traffic(rest: Simulator) -> None:
    """A deleted instance generates nothing more; created again, its traffic resumes."""
    with Simulator(SECRET, api_key=API_KEY, rates={EVENT: 200}, instances=["acme"]) as s:
        wait_until(lambda: s.stats()["slots"]["acme"][EVENT]["seq"] > 0)
        s.delete_instance("acme")
        seq = s.stats()["slots"]["acme"][EVENT]["seq"]
        assert s.stats()["slots"]["acme"][EVENT]["rate"] == 0
        s.create_instance("acme")
        wait_until(lambda: s.stats()["slots"]["acme"][EVENT]["seq"] > seq)
        s.create_instance("fresh")  # a new instance's rated slots exist at once
        wait_until(lambda: s.stats()["slots"].get("fresh", {}).get(EVENT, {}).get("seq", 0) > 0)


def test_refresh_token_like_upstream(rest: Simulator) -> None:
    """PUT refreshToken with the current token answers 201 and a new one; the old is spent."""
    old = rest.instance_token("acme")
    path = "/instance/refreshToken/acme"
    status, auth = api(rest, path, key=None, method="PUT", body={"oldToken": old})
    assert status == 201
    assert auth["token"] != old
    assert rest.instance_token("acme") == auth["token"]
    assert api(rest, path, key=None, method="PUT", body={"oldToken": old})[0] == 401
    assert api(rest, path, key=None, method="PUT", body={})[0] == 401
    assert api(rest, "/instance/refreshToken/nobody", key=None, method="PUT", body={})[0] == 400


def test_refresh_accepts_an_expired_token_and_keeps_its_lifetime() -> None:
    """An expired current token still refreshes; the new one has the same lifetime."""
    with Simulator(SECRET, api_key=API_KEY) as s:
        s.create_instance("acme", expires_in=-10)
        path = "/instance/refreshToken/acme"
        old = s.instance_token("acme")
        status, auth = api(s, path, key=None, method="PUT", body={"oldToken": old})
        assert status == 201
        claims = JWT_CODEC.decode(
            auth["token"], SECRET, algorithms=["HS256"], options={"verify_exp": False}
        )
        assert claims["exp"] - claims["iat"] == -10


def raw_listing(sim: Simulator) -> tuple[int | None, bytes]:
    """(status, body) of one listing request, or (None, b"") if the connection was cut."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{sim.port}{LISTING}", headers={"apikey": API_KEY}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, ConnectionError):
        return None, b""


def test_api_faults_for_the_next_requests_then_normal(rest: Simulator) -> None:
    """Each API fault mode answers as documented for `count` requests, then the listing."""
    rest.api_fault("status", count=2, status=502)
    assert raw_listing(rest)[0] == raw_listing(rest)[0] == 502
    rest.api_fault("garbage")
    status, body = raw_listing(rest)
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    rest.api_fault("object")
    assert isinstance(json.loads(raw_listing(rest)[1]), dict)
    rest.api_fault("empty")
    assert json.loads(raw_listing(rest)[1]) == []
    rest.api_fault("reset")
    assert raw_listing(rest) == (None, b"")
    assert [r["name"] for r in json.loads(raw_listing(rest)[1])] == ["acme", "beta"]
    # A wrong key is refused before any fault applies, and does not use one up.
    rest.api_fault("status", count=-1)
    assert api(rest, key="wrong")[0] == 401
    assert raw_listing(rest)[0] == raw_listing(rest)[0] == 503
    assert http_json(rest, "/control/api_heal", {}) == (200, {"ok": True, "rules": 1})
    assert raw_listing(rest)[0] == 200
    assert http_json(rest, "/control/api_fault", {"mode": "nonsense"})[0] == 400


def test_api_hang_outlasts_a_client_timeout(rest: Simulator) -> None:
    """The hang fault answers nothing for `seconds`: a client with a shorter timeout gives up."""
    rest.api_fault("hang", seconds=30)
    req = urllib.request.Request(
        f"http://127.0.0.1:{rest.port}{LISTING}", headers={"apikey": API_KEY}
    )
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(req, timeout=0.3)  # noqa: S310
    assert raw_listing(rest)[0] == 200  # the fault was used up by the first request


# --------------------------------------------------------------------------- rates


def test_rate_pacing_is_roughly_right() -> None:
    """A configured rate delivers about that many frames per second, in seq order."""
    with Simulator(SECRET, rates={EVENT: 400}) as s:
        ws = connect(s)
        seqs: list[int] = []
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            seqs.append(payloads.seq_of(EVENT, ws.recv()))
        ws.close()
    assert 200 <= len(seqs) <= 600
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_frames_are_generated_and_dropped_without_a_holder() -> None:
    """Pre-declared instances generate traffic for sent events before anyone connects."""
    with Simulator(SECRET, default_rate=200, instances=["acme"]) as s:
        wait_until(lambda: s.stats()["slots"]["acme"][EVENT]["dropped"] >= 20)
        slots = s.stats()["slots"]["acme"]
    assert set(slots) == set(payloads.SENT_EVENTS)  # silent events have no traffic
    assert all(v["delivered"] == 0 for v in slots.values())


def test_set_rate_at_runtime(sim: Simulator) -> None:
    """set_rate starts and stops generation on a live slot."""
    ws = connect(sim)
    sim.set_rate(EVENT, 300)
    first = recv_seqs(ws, 30)
    sim.set_rate(EVENT, 0)
    time.sleep(0.05)
    seq = slot_stats(sim)["seq"]
    time.sleep(0.3)
    assert slot_stats(sim)["seq"] == seq
    assert first == list(range(1, 31))
    assert slot_stats(sim)["rate"] == 0.0
    ws.close()


def test_fixed_frame_size_for_benchmarks() -> None:
    """frame_size makes every generated frame exactly that many bytes."""
    with Simulator(SECRET, frame_size=300) as s:
        ws = connect(s)
        s.send(INSTANCE, EVENT, 50)
        frames = [ws.recv() for _ in range(50)]
        ws.close()
    assert {len(f) for f in frames} == {300}
    assert [payloads.seq_of(EVENT, f) for f in frames] == list(range(1, 51))


# --------------------------------------------------------------------------- lifecycle


def test_many_idle_connections() -> None:
    """Hundreds of idle connections are held at once and all stay usable."""
    with Simulator(SECRET) as s:
        clients = [connect(s, instance=f"i{n}") for n in range(300)]
        assert s.stats()["connections_open"] == 300
        s.send("i299", EVENT, 1)
        assert recv_seqs(clients[-1], 1) == [1]
        for ws in clients:
            ws.close()


def test_stop_is_idempotent_and_closes_connections() -> None:
    """stop() ends client connections with EOF (no close frame) and can be called twice."""
    s = Simulator(SECRET).start()
    ws = connect(s)
    s.stop()
    s.stop()
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        ws.recv_data(control_frame=True)
    with pytest.raises(RuntimeError):
        s.stats()


def test_delivered_frames_requires_record() -> None:
    """delivered_frames() refuses to run without record=True."""
    with Simulator(SECRET) as s, pytest.raises(RuntimeError, match="record"):
        s.delivered_frames(INSTANCE, EVENT)


def test_cli_token_prints_verifiable_token(capsys: pytest.CaptureFixture[str]) -> None:
    """`simulate token` prints a token signed with the given secret."""
    assert main(["token", "--instance", "demo", "--secret", SECRET, "--expires-in", "60"]) == 0
    token = capsys.readouterr().out.strip()
    header, claims, signature = token.split(".")
    digest = hmac.new(SECRET.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    assert signature == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert jwt.decode(token, options={"verify_signature": False})["instanceName"] == "demo"


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    """`simulate` prints its URL, serves, rewrites the stats file, and exits 0 on SIGTERM."""
    stats_file = tmp_path / "stats.json"
    code = "import sys; from forwarder_sim import main; sys.exit(main(sys.argv[1:]))"
    args = ["--port", "0", "--stats-file", str(stats_file), "--rate", f"{EVENT}=50"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("FORWARDER_SIM_SECRET", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"ws://127\.0\.0\.1:(\d+)/ws/events", line)
        assert match, line
        url = (
            f"ws://127.0.0.1:{match.group(1)}/ws/events?{query(EVENT, mint_token('x', DEV_SECRET))}"
        )
        ws = websocket.create_connection(url, timeout=5)
        assert payloads.seq_of(EVENT, ws.recv()) >= 1
        wait_until(stats_file.exists, timeout=5)
        ws.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert json.loads(stats_file.read_text())["slots"]["x"][EVENT]["delivered"] >= 1
    finally:
        proc.kill()
        proc.wait()
