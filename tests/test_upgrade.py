"""The opening handshake's rules without a socket: the request, and every kind of answer."""

from __future__ import annotations

import base64

import pytest

from forwarder.errors import ConnectFailed
from forwarder.upgrade import (
    CLOSED_DURING_UPGRADE,
    MAX_RESPONSE_HEAD,
    Accepted,
    ClientUpgrade,
    Rejected,
    accept_value,
)
from forwarder_sim import encode_frame

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3's example
TARGET = "/ws/events?event=messages.upsert&token=SECRET-TOKEN"


def answer(accept: bytes | None = None, extra: bytes = b"") -> bytes:
    accept = accept_value(KEY) if accept is None else accept
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n" + extra + b"\r\n"
    )


def test_the_accept_value_is_the_rfcs_example() -> None:
    """RFC 6455 1.3: the sample nonce's Sec-WebSocket-Accept."""
    assert accept_value(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_the_request_is_an_http_11_upgrade_with_a_fresh_key() -> None:
    """GET target, Host, Upgrade, Connection, version 13, and a 16-byte key new each time."""
    request = ClientUpgrade("127.0.0.1:8084", TARGET).request
    head = request.decode()
    assert head.startswith(f"GET {TARGET} HTTP/1.1\r\n")
    lines = {
        line.split(": ", 1)[0].lower(): line.split(": ", 1)[1]
        for line in head.split("\r\n")[1:]
        if ": " in line
    }
    assert lines["host"] == "127.0.0.1:8084"
    assert lines["upgrade"] == "websocket"
    assert lines["connection"] == "Upgrade"
    assert lines["sec-websocket-version"] == "13"
    assert len(base64.b64decode(lines["sec-websocket-key"])) == 16
    assert request.endswith(b"\r\n\r\n")
    assert ClientUpgrade("h", "/").request != ClientUpgrade("h", "/").request


def test_a_101_fed_byte_by_byte_is_accepted_with_nothing_early() -> None:
    """However the answer is cut, the outcome comes with its last byte."""
    upgrade = ClientUpgrade("h", TARGET, KEY)
    data = answer()
    for i in range(len(data) - 1):
        assert upgrade.receive(data[i : i + 1]) is None
    assert upgrade.receive(data[-1:]) == Accepted(b"")


def test_frames_in_the_same_read_as_the_101_are_handed_on() -> None:
    """What follows the headers is the start of the WebSocket stream: kept, byte for byte."""
    frames = encode_frame(b'{"n":1}') + encode_frame(b'{"n":2}')[:3]
    outcome = ClientUpgrade("h", TARGET, KEY).receive(answer() + frames)
    assert outcome == Accepted(frames)


def test_headers_in_any_case_and_a_connection_list_are_accepted() -> None:
    """Header names and the Upgrade/Connection tokens compare without case."""
    data = (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\n"
        b"connection: keep-alive, upgrade\r\nsec-websocket-accept: "
        + accept_value(KEY)
        + b"\r\n\r\n"
    )
    assert ClientUpgrade("h", TARGET, KEY).receive(data) == Accepted(b"")


@pytest.mark.parametrize("status", [401, 403, 404, 301, 302, 500, 503])
def test_a_final_status_is_a_rejection_and_a_redirect_is_not_followed(status: int) -> None:
    """Any final status but 101 is the server's answer; a 3xx's Location is not followed."""
    data = f"HTTP/1.1 {status} X\r\nLocation: ws://elsewhere/\r\nContent-Length: 0\r\n\r\n"
    assert ClientUpgrade("h", TARGET, KEY).receive(data.encode()) == Rejected(status)


def test_a_100_continue_before_the_answer_is_skipped() -> None:
    """An interim 1xx is not the answer."""
    data = b"HTTP/1.1 100 Continue\r\n\r\n" + answer()
    assert ClientUpgrade("h", TARGET, KEY).receive(data) == Accepted(b"")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (answer(accept=b"AAAAAAAAAAAAAAAAAAAAAAAAAAA="), "wrong Sec-WebSocket-Accept"),
        (answer(accept=b""), "wrong Sec-WebSocket-Accept"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            "without upgrading to WebSocket",
        ),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "is not HTTP"),
        (f"GET {TARGET} HTTP/1.1\r\nHost: h\r\n\r\n".encode(), "is not HTTP"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), "is not HTTP"),
    ],
)
def test_answers_that_are_no_websocket_upgrade_fail_clearly(data: bytes, message: str) -> None:
    """A 101 that is not a WebSocket upgrade, or no HTTP at all (another protocol, TLS on a
    ws:// URL, our own request echoed back): ConnectFailed naming what is wrong, never the
    token."""
    with pytest.raises(ConnectFailed, match=message) as info:
        ClientUpgrade("h", TARGET, KEY).receive(data)
    assert "SECRET-TOKEN" not in str(info.value)


def test_the_server_closing_mid_answer_fails() -> None:
    """EOF (an empty read) before the answer is complete."""
    upgrade = ClientUpgrade("h", TARGET, KEY)
    assert upgrade.receive(answer()[:20]) is None
    with pytest.raises(ConnectFailed, match=CLOSED_DURING_UPGRADE):
        upgrade.receive(b"")


def test_an_endless_header_block_is_refused_at_the_bound() -> None:
    """A server that never ends its headers cannot make us buffer without bound."""
    upgrade = ClientUpgrade("h", TARGET, KEY)
    upgrade.receive(b"HTTP/1.1 101 Switching Protocols\r\n")
    line = b"X-Filler: " + b"x" * 1000 + b"\r\n"
    for _ in range(MAX_RESPONSE_HEAD // len(line) - 1):
        assert upgrade.receive(line) is None
    with pytest.raises(ConnectFailed, match="is not HTTP"):
        upgrade.receive(line * 3)
