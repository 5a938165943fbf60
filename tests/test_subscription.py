"""The subscription's rules without sockets or threads: a fake clock, bytes in, actions out.

Every rule of subscription.py (and the helpers it delegates to) is driven here the way an I/O
loop would drive it, with time advanced in milliseconds: backoff by cause, keepalive, read
timeout, close handshakes, make-before-break, displacement evidence and its guard, flapping,
token expiry warnings, gap intervals, restart gaps and the may_connect hook.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import uuid
from typing import Any, cast

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forwarder.actions import Connect, Listen, Release, Send
from forwarder.backoff import ReconnectBackoff
from forwarder.config import Backoff, Secret, SourceConfig, Subscription, TokenRef
from forwarder.decode import REASONS, invalid_reason
from forwarder.displacement import EVIDENCE_FRAMES, evidence_window
from forwarder.errors import ConfigError, ConnectFailed, HandshakeRejected
from forwarder.frames import Opcode
from forwarder.gaps import Outbox
from forwarder.link import CLOSE_ECHO_TIMEOUT, MASK_POOL_BYTES, random_mask
from forwarder.sink import dead_letter_fields
from forwarder.spool import GAP, Entry, Route
from forwarder.stats import State, SubscriptionStats
from forwarder.subscription import SubscriptionRules
from forwarder_sim import encode_frame, mint_token

UP = "messages.upsert"
ROUTE = Route("main", UP, UP, f"{UP}:dlq")
BASE = 1_800_000_000.0  # the fake wall clock at monotonic 0


class FakeClock:
    """Monotonic seconds from 0, and a wall clock BASE seconds ahead of it. Kept in
    milliseconds, so that sums of whole milliseconds are exact."""

    def __init__(self) -> None:
        self.ms = 0.0

    @property
    def now(self) -> float:
        return self.ms / 1000.0

    def monotonic(self) -> float:
        return self.ms / 1000.0

    def wall(self) -> float:
        return BASE + self.ms / 1000.0


def source(name: str = "main", /, **overrides: object) -> SourceConfig:
    settings_: dict[str, object] = {
        "name": name,
        "url": "ws://127.0.0.1:9/ws/events",
        "token": TokenRef(value=Secret(mint_token(name, "s")), origin=f"unit {name}"),
    }
    settings_.update(overrides)
    return SourceConfig(**settings_)  # type: ignore[arg-type]


def client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Decode masked client-to-server frames (what the rules asked the loop to write)."""
    out = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert b1 & 0x80, "client frames must be masked"
        n = b1 & 0x7F
        pos += 2
        if n == 126:
            n = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        mask = data[pos : pos + 4]
        pos += 4
        body = bytes(c ^ mask[i % 4] for i, c in enumerate(data[pos : pos + n]))
        pos += n
        out.append((b0 & 0x0F, body))
    return out


def text(n: int, tag: str = "f") -> bytes:
    return orjson.dumps({"n": n, "tag": tag})


def frames_of(*numbers: int, tag: str = "f") -> bytes:
    return b"".join(encode_frame(text(n, tag)) for n in numbers)


ECHO_1000 = encode_frame(b"\x03\xe8", Opcode.CLOSE)
PONG = encode_frame(b"", Opcode.PONG)


class Harness:
    """Plays the I/O loop for one SubscriptionRules: performs its actions, records them."""

    def __init__(
        self,
        src: SourceConfig | None = None,
        *,
        resume_from: float | None = None,
        may_connect: bool = True,
        token_expiry: float | None = None,
        event: str = UP,
        **fleet: Any,
    ) -> None:
        self.src = src or source()
        self.clock = FakeClock()
        self.outbox = Outbox()
        self.stats = SubscriptionStats(self.src.name, event, event)
        self.allowed = may_connect
        self.token_exp = token_expiry
        sub = Subscription(self.src, event, event, f"{event}:dlq")
        self.rules = SubscriptionRules(
            0,
            sub,
            self.stats,
            ReconnectBackoff(self.src.backoff, lambda: 1.0),
            self.outbox,
            clock=self.clock,
            token_expiry=lambda: self.token_exp,
            may_connect=lambda: self.allowed,
            resume_from=resume_from,
            **fleet,
        )
        self.connects: list[int] = []  # Connect actions not answered yet
        self.listening: set[int] = set()
        self.released: list[int] = []
        self.written: dict[int, bytes] = {}
        self.entries: list[Entry] = []

    def run(self) -> None:
        rules = self.rules
        while rules.actions:
            actions, rules.actions = rules.actions, []
            for action in actions:
                if isinstance(action, Connect):
                    self.connects.append(action.link_id)
                elif isinstance(action, Listen):
                    self.listening.add(action.link_id)
                elif isinstance(action, Send):
                    self.written[action.link_id] = self.written.get(action.link_id, b"") + (
                        action.data
                    )
                elif isinstance(action, Release):
                    self.listening.discard(action.link_id)
                    self.released.append(action.link_id)
        entries, _ = self.outbox.take()
        self.entries += entries

    def start(self) -> None:
        self.rules.start()
        self.run()

    def accept(self, exp: float | None = None) -> int:
        link = self.connects.pop(0)
        self.rules.handshake_succeeded(link, exp)
        self.run()
        return link

    def refuse(self, error: ConfigError | HandshakeRejected | ConnectFailed) -> None:
        self.rules.handshake_failed(self.connects.pop(0), error)
        self.run()

    def feed(self, link: int, data: bytes) -> None:
        self.rules.received(link, data)
        self.run()

    def eof(self, link: int) -> None:
        self.rules.transport_lost(link, "EOF")
        self.run()

    def advance(self, ms: float) -> None:
        """Let `ms` milliseconds pass, ticking the rules at each deadline on the way."""
        target = self.clock.ms + ms
        for _ in range(100_000):
            due = self.rules.deadline() * 1000.0
            if due > target:
                break
            self.clock.ms = max(self.clock.ms, due)
            self.rules.tick()
            self.run()
        else:
            raise AssertionError("the rules keep asking for a tick: a busy loop")
        self.clock.ms = target

    def finished(self) -> bool:
        return self.rules.finished

    def sent(self, link: int) -> list[tuple[int, bytes]]:
        return client_frames(self.written.get(link, b""))

    def frames(self) -> list[int]:
        return [orjson.loads(cast(bytes, e.payload))["n"] for e in self.entries if e.opcode != GAP]

    def gaps(self) -> list[dict[str, object]]:
        return [orjson.loads(cast(bytes, e.payload)) for e in self.entries if e.opcode == GAP]


def delay_left(h: Harness) -> float:
    """Seconds until the next attempt, from the stats (unix times: compare differences, as
    pytest.approx's relative tolerance is wide at 1.8e9)."""
    assert h.stats.next_attempt_at is not None
    return h.stats.next_attempt_at - h.clock.wall()


def ms(wall_offset: float) -> int:
    """The gap record's millisecond value for fake monotonic time `wall_offset`."""
    return int((BASE + wall_offset) * 1000)


# -- reconnect backoff by cause ---------------------------------------------------------------


def test_transient_failures_retry_quickly_with_growing_delays() -> None:
    """Refused connections: attempts after 0.5, 1 and 2 s (rand = 1), not a millisecond sooner."""
    h = Harness()
    h.start()
    for delay_ms in (500, 1000, 2000):
        h.refuse(ConnectFailed("ConnectionRefusedError: refused"))
        assert h.stats.state is State.BACKOFF
        assert delay_left(h) == pytest.approx(delay_ms / 1000)
        h.advance(delay_ms - 1)
        assert h.connects == []
        h.advance(1)
        assert len(h.connects) == 1
    assert h.stats.handshake_failures["error"] == 3
    assert h.stats.reconnects == 3


@pytest.mark.parametrize(
    "error", [HandshakeRejected(401), HandshakeRejected(403), ConfigError("token file gone")]
)
def test_auth_failures_and_unreadable_tokens_back_off_slowly(
    error: ConfigError | HandshakeRejected,
) -> None:
    """401/403 and an unreadable token: 5 s, 10 s, 20 s (auth delays), never the quick ones."""
    h = Harness()
    h.start()
    for delay_ms in (5000, 10000, 20000):
        h.refuse(error)
        h.advance(delay_ms - 1)
        assert h.connects == []
        h.advance(1)
        assert len(h.connects) == 1
    h.refuse(HandshakeRejected(503))  # a 5xx is transient: the quick schedule
    h.advance(500)
    assert len(h.connects) == 1


def test_a_connection_that_lasted_stable_after_resets_the_backoff_and_a_shorter_one_does_not() -> (
    None
):
    """After two failures, a 29.9 s connection is followed by the third delay (2 s); a 30 s one
    (stable_after) by the first again (0.5 s)."""
    for lasted_ms, delay_ms in ((29_900, 2000), (30_000, 500)):
        h = Harness(source(ping_interval=3600.0))
        h.start()
        h.refuse(ConnectFailed("refused"))
        h.advance(500)
        h.refuse(ConnectFailed("refused"))
        h.advance(1000)
        link = h.accept()
        h.advance(lasted_ms)
        h.eof(link)
        assert delay_left(h) == pytest.approx(delay_ms / 1000)


# -- keepalive, read timeout, protocol errors -------------------------------------------------


def test_a_silent_connection_is_pinged_and_dropped_when_no_byte_answers() -> None:
    """20 s of silence: a ping; any byte clears it; then no byte within 10 s: code 1006, and the
    gap starts at the last byte received."""
    h = Harness()
    h.start()
    link = h.accept()
    h.advance(19_999)
    assert h.sent(link) == []
    h.advance(1)
    assert h.sent(link) == [(Opcode.PING, b"")]
    h.advance(5_000)
    h.feed(link, PONG)  # 25 s: alive
    last_byte = h.clock.now
    h.advance(20_000)  # 45 s: the second ping
    assert [op for op, _ in h.sent(link)] == [Opcode.PING, Opcode.PING]
    h.advance(9_999)
    assert link in h.listening
    h.advance(1)
    assert link in h.released
    assert h.stats.close_codes["1006"] == 1
    assert h.stats.last_error == "no pong within 10s"
    h.advance(500)
    h.accept()
    (gap,) = h.gaps()
    assert (gap["cause"], gap["start"]) == ("close:1006", ms(last_byte))
    assert gap["end"] == ms(h.clock.now)


@pytest.mark.parametrize("interval_ms", [20_000, 2_000])
def test_keepalive_pings_are_due_on_a_grid_so_idle_connections_ping_together(
    interval_ms: int,
) -> None:
    """Connections silent since 0.3 and 0.9 grid steps past a grid line both ping on the next
    grid line after ping_interval (a step is ping_interval / 20), never earlier, at most one
    step late: thousands of idle connections ping in a few loop turns, not one turn each."""
    step = interval_ms // 20
    pinged_at = []
    for offset in (3 * step // 10, 9 * step // 10):
        h = Harness(source(ping_interval=interval_ms / 1000.0))
        h.advance(offset)
        h.start()
        link = h.accept()
        h.advance(interval_ms - 1)
        assert h.sent(link) == [], "pinged before ping_interval of silence"
        h.advance(step - offset)
        assert h.sent(link) == [], "pinged off the grid"
        h.advance(1)
        assert h.sent(link) == [(Opcode.PING, b"")]
        pinged_at.append(h.clock.ms)
    assert pinged_at == [interval_ms + step, interval_ms + step]


def test_a_frame_that_does_not_finish_within_read_timeout_fails_even_while_bytes_trickle() -> None:
    """A frame announcing 1,000 bytes, then 10 bytes every 5 s: the connection is failed 30 s
    after the frame began, though bytes keep arriving (the ping never fires)."""
    h = Harness()
    h.start()
    link = h.accept()
    h.advance(1_000)
    h.feed(link, bytes([0x81, 126]) + (1000).to_bytes(2, "big") + b"x" * 10)
    started = h.clock.now
    for _ in range(5):
        h.advance(5_000)
        h.feed(link, b"x" * 10)
    h.advance((started + 30.0 - h.clock.now) * 1000 - 1)
    assert link in h.listening
    h.advance(1)
    assert link in h.released
    assert h.stats.last_error == "stalled for 30s in the middle of a frame"


def test_frames_split_across_reads_are_progress_and_never_hit_the_read_timeout() -> None:
    """For 89 s every read completes one frame and starts the next: no timeout, all kept."""
    h = Harness()
    h.start()
    link = h.accept()
    stream = frames_of(*range(10, 100))  # 90 frames of one size
    size = len(encode_frame(text(10)))
    h.feed(link, stream[: size // 2])
    pos = size // 2
    for _ in range(89):
        h.advance(1_000)
        h.feed(link, stream[pos : pos + size])  # ends half-way into the next frame
        pos += size
    assert link in h.listening
    assert h.frames() == list(range(10, 99))
    assert h.rules.stats.close_codes == {"1006": 0}


def test_a_header_claiming_2_62_bytes_fails_the_connection_at_once_keeping_the_frames_before() -> (
    None
):
    """Two frames, a header claiming 2^62 bytes, then a valid-looking frame, in one read: the two
    are kept, our close says 1002, the gap is recorded, the reconnect is quick."""
    h = Harness()
    h.start()
    link = h.accept()
    bogus = bytes([0x81, 127]) + (1 << 62).to_bytes(8, "big")
    h.feed(link, frames_of(1, 2) + bogus + frames_of(3))
    assert h.frames() == [1, 2]
    assert h.sent(link) == [(Opcode.CLOSE, (1002).to_bytes(2, "big"))]
    assert link in h.released
    assert h.stats.close_codes["1002"] == 1
    assert "claims 4611686018427387904 bytes" in str(h.stats.last_error)
    h.advance(500)
    h.accept()
    (gap,) = h.gaps()
    assert gap["cause"] == "close:1002"


@pytest.mark.parametrize(
    "violation",
    [
        bytes([0xC1, 2]) + b"{}",  # RSV1 set, no extension negotiated
        bytes([0x88, 126]) + (130).to_bytes(2, "big") + b"\x03\xe8" + b"r" * 128,  # long reason
        bytes([0x81, 0x82, 1, 2, 3, 4, 0x7A, 0x7F]),  # a masked server frame
        bytes([0x80, 0]),  # a continuation with nothing to continue
    ],
)
def test_frames_before_a_protocol_violation_in_the_same_read_are_kept(violation: bytes) -> None:
    """Valid frames and a violation in one read: the frames reach the spool, then code 1002."""
    h = Harness()
    h.start()
    link = h.accept()
    h.feed(link, frames_of(1, 2, 3) + violation)
    assert h.frames() == [1, 2, 3]
    assert h.stats.received == 3
    assert h.stats.close_codes["1002"] == 1
    assert link in h.released


def test_a_server_close_is_echoed_counted_and_recorded_as_a_gap() -> None:
    """The server closes with 1011: echoed, counted, a reconnect after 0.5 s, gap close:1011."""
    h = Harness()
    h.start()
    link = h.accept()
    h.feed(link, frames_of(1) + encode_frame(b"\x03\xf3bye", Opcode.CLOSE) + frames_of(2))
    assert h.frames() == [1]
    assert h.sent(link) == [(Opcode.CLOSE, (1011).to_bytes(2, "big"))]
    assert h.stats.close_codes["1011"] == 1
    assert h.stats.last_error == "closed by the server: 1011 bye"
    h.advance(500)
    h.accept()
    assert h.gaps()[0]["cause"] == "close:1011"


def test_server_pings_are_answered_with_their_payload() -> None:
    """A ping from the server gets a pong carrying the same bytes."""
    h = Harness()
    h.start()
    link = h.accept()
    h.feed(link, encode_frame(b"hello", Opcode.PING))
    assert h.sent(link) == [(Opcode.PONG, b"hello")]


# -- make-before-break, displacement, flapping ------------------------------------------------


def quiet(**overrides: object) -> SourceConfig:
    """A source whose keepalive stays out of the way: no pings to answer in these tests."""
    return source("main", ping_interval=3600.0, **overrides)


def resubscribed(h: Harness, old: int, in_flight: bytes = b"") -> int:
    """Complete a make-before-break: accept the new connection, drain and close the old one."""
    assert old in h.listening
    new = h.accept()
    assert new not in h.listening  # parked until the old one is drained
    assert h.sent(old)[-1] == (Opcode.CLOSE, (1000).to_bytes(2, "big"))
    h.feed(old, in_flight + ECHO_1000)
    assert old in h.released
    assert new in h.listening
    return new


def test_silence_resubscribes_make_before_break_and_keeps_every_frame_in_order() -> None:
    """300 s without a data frame: a new connection while the old one is still read; frames in
    flight on the old one are kept, before the new one's; no gap, no reconnect."""
    h = Harness(quiet())
    h.start()
    old = h.accept()
    h.feed(old, frames_of(1, 2))
    h.advance(299_999)
    assert h.connects == []
    h.advance(1)
    assert len(h.connects) == 1  # the old connection is still open and read meanwhile
    h.feed(old, frames_of(3))
    new = resubscribed(h, old, in_flight=frames_of(4))
    h.feed(new, frames_of(5, 6, 7))
    assert h.frames() == [1, 2, 3, 4, 5, 6, 7]
    assert (h.stats.resubscribes["silence"], h.stats.reconnects, h.stats.displacements) == (1, 0, 0)
    assert h.gaps() == []  # frames drained from the old one: it held the feed until the switch


def test_traffic_resuming_at_once_on_the_new_connection_is_a_displacement_with_a_gap() -> None:
    """The old connection was silent 300 s and drained nothing; 3 frames within W (3 s) on the
    new one: displaced, with a gap from the last frame to the switch."""
    h = Harness(quiet())
    h.start()
    old = h.accept()
    h.feed(old, frames_of(1))
    last_frame = h.clock.now
    h.advance(300_000)
    h.advance(40)
    new = resubscribed(h, old)
    switched = h.clock.now
    h.advance(2_900)
    h.feed(new, frames_of(2, 3))
    assert h.stats.displacements == 0
    h.feed(new, frames_of(4))
    assert h.stats.displacements == 1
    (gap,) = h.gaps()
    assert (gap["cause"], gap["recovered"]) == ("watchdog", 1)
    assert (gap["start"], gap["end"]) == (ms(last_frame), ms(switched))
    closed, open_since = h.stats.blind
    assert closed == pytest.approx(switched - last_frame)
    assert open_since is None


def test_frames_drained_from_the_old_connection_show_it_held_the_feed() -> None:
    """The old connection was silent 300 s, then yields a frame while being drained: it held
    the feed until the switch, so 3 frames at once on the new one are no displacement."""
    h = Harness(quiet())
    h.start()
    old = h.accept()
    h.advance(300_000)
    new = resubscribed(h, old, in_flight=frames_of(1))
    h.feed(new, frames_of(2, 3, 4))
    assert h.frames() == [1, 2, 3, 4]
    assert (h.stats.displacements, h.gaps()) == (0, [])


def test_traffic_after_the_evidence_window_is_no_displacement() -> None:
    """Three frames, the third 3.1 s after the switch (W = 3 s): a quiet event, not displaced."""
    h = Harness(quiet())
    h.start()
    old = h.accept()
    h.advance(300_000)
    new = resubscribed(h, old)
    h.feed(new, frames_of(1, 2))
    h.advance(3_100)
    h.feed(new, frames_of(3))
    assert (h.stats.displacements, h.gaps()) == (0, [])


@pytest.mark.parametrize(("silent_s", "displaced"), [(10.0, False), (11.9, False), (12.0, True)])
def test_an_old_connection_silent_less_than_four_windows_is_never_taken_for_displaced(
    silent_s: float, displaced: bool
) -> None:
    """Periodic re-subscribe (W = 3 s): traffic resumes at once on the new connection, but the
    old one had a frame less than 4 W = 12 s before: not evidence of a displacement."""
    h = Harness(quiet(resubscribe_interval=60.0))
    h.start()
    old = h.accept()
    h.advance((60.0 - silent_s) * 1000)
    h.feed(old, frames_of(1))
    h.advance(silent_s * 1000)
    assert len(h.connects) == 1  # the periodic re-subscribe
    new = resubscribed(h, old)
    h.feed(new, frames_of(2, 3, 4))
    assert h.stats.resubscribes["periodic"] == 1
    assert h.stats.displacements == int(displaced)
    assert [g["cause"] for g in h.gaps()] == (["periodic"] if displaced else [])


def test_a_quiet_event_resubscribes_on_silence_and_logs_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """call.upsert stays silent: a re-subscribe every 300 s, nothing on either connection, no
    displacement; INFO the first time, DEBUG after."""
    caplog.set_level(logging.DEBUG, logger="forwarder.displacement")
    h = Harness(quiet(), event="call.upsert")
    h.start()
    link = h.accept()
    for _ in range(3):
        h.advance(300_000)
        link = resubscribed(h, link)
    assert (h.stats.resubscribes["silence"], h.stats.displacements) == (3, 0)
    levels = [r.levelno for r in caplog.records if "re-subscribed" in r.getMessage()]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG]


def test_repeated_displacements_are_flapping_and_the_watchdog_stands_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two displacements within flap_window (threshold 2): an ERROR naming the likely cause, and
    no silence re-subscribe for flap_backoff (600 s), then one again."""
    caplog.set_level(logging.WARNING)
    h = Harness(quiet(flap_threshold=2, flap_backoff=600.0))
    h.start()
    link = h.accept()
    for _ in range(2):
        h.advance(300_000)
        link = resubscribed(h, link)
        h.feed(link, frames_of(1, 2, 3))
    assert h.stats.displacements == 2
    assert h.stats.flapping_until is not None
    assert h.stats.flapping_until - h.clock.wall() == pytest.approx(600.0)
    assert any(
        "flapping" in r.getMessage() and "same token" in r.getMessage() for r in caplog.records
    )
    h.advance(599_000)
    assert h.connects == []  # 300 s of silence passed twice over: standing down
    h.advance(1_000)
    assert len(h.connects) == 1


def test_a_failed_resubscribe_keeps_the_current_connection_and_waits_its_backoff() -> None:
    """The new connection is refused (503): the old one stays and keeps delivering; the next try
    waits the backoff delay (0.5 s)."""
    h = Harness(quiet())
    h.start()
    link = h.accept()
    h.advance(300_000)
    h.refuse(HandshakeRejected(503))
    assert link in h.listening
    h.feed(link, frames_of(1))
    h.advance(300_000 - 1)  # the frame reset the silence: the next try is due 300 s after it
    assert h.connects == []
    h.advance(1)
    h.refuse(HandshakeRejected(503))
    h.advance(999)
    assert h.connects == []
    h.advance(1)  # the second failure's delay: 1 s
    assert len(h.connects) == 1
    assert (h.stats.reconnects, h.stats.handshake_failures["503"]) == (0, 2)
    assert h.stats.resubscribes["silence"] == 0
    assert h.frames() == [1]


def test_a_connection_lost_during_a_resubscribe_is_reconnected_by_it() -> None:
    """The old connection drops while the new one's handshake is under way: that one becomes the
    reconnect, closing the gap."""
    h = Harness(quiet())
    h.start()
    old = h.accept()
    h.advance(300_000)
    h.eof(old)
    assert h.stats.close_codes["1006"] == 1
    new = h.accept()
    assert new in h.listening
    assert h.stats.reconnects == 1
    assert [g["cause"] for g in h.gaps()] == ["close:1006"]


# -- stopping ---------------------------------------------------------------------------------


def test_stop_closes_politely_and_keeps_the_frames_in_flight() -> None:
    """stop(): a 1001 close frame; frames before the echo are kept; finished at the echo."""
    h = Harness()
    h.start()
    link = h.accept()
    h.rules.stop()
    h.run()
    assert h.sent(link) == [(Opcode.CLOSE, (1001).to_bytes(2, "big"))]
    assert not h.finished()
    h.feed(link, frames_of(1, 2) + encode_frame(b"\x03\xe9", Opcode.CLOSE))
    assert h.frames() == [1, 2]
    assert h.finished()
    assert h.stats.state is State.STOPPED
    assert h.stats.close_codes == {"1006": 0}  # a planned end is not a failure


def test_stop_gives_up_on_a_missing_echo_after_the_close_timeout() -> None:
    """No echo: the socket is released CLOSE_ECHO_TIMEOUT after the close frame."""
    h = Harness()
    h.start()
    link = h.accept()
    h.rules.stop()
    h.run()
    h.advance(CLOSE_ECHO_TIMEOUT * 1000 - 1)
    assert not h.finished()
    h.advance(1)
    assert h.finished()
    assert link in h.released


def test_stop_while_backing_off_or_connecting_finishes_at_once() -> None:
    """Nothing open: stop() finishes at once; a handshake answer arriving later is released."""
    h = Harness()
    h.start()
    h.rules.stop()
    h.run()
    assert h.finished()
    late = h.connects.pop()
    h.rules.handshake_succeeded(late)
    h.run()
    assert late in h.released
    assert late not in h.listening


def test_a_parked_replacement_is_read_and_closed_when_stopping_during_a_switch() -> None:
    """stop() while the old connection drains: the new one is read (its frames in flight kept)
    and closed politely too."""
    h = Harness(quiet())
    h.start()
    old = h.accept()
    h.advance(300_000)
    new = h.accept()
    h.rules.stop()
    h.run()
    h.feed(old, frames_of(1) + ECHO_1000)
    assert new in h.listening
    assert h.sent(new) == [(Opcode.CLOSE, (1001).to_bytes(2, "big"))]
    h.feed(new, frames_of(2) + ECHO_1000)
    assert h.frames() == [1, 2]
    assert h.finished()


# -- gaps -------------------------------------------------------------------------------------


def test_a_drop_is_a_gap_from_the_loss_to_the_next_handshake() -> None:
    """EOF at t, reconnect 0.5 s later, handshake done 0.2 s after: gap [t, t + 0.7 s]."""
    h = Harness()
    h.start()
    link = h.accept()
    h.advance(10_000)
    h.eof(link)
    lost = h.clock.now
    h.advance(700)
    h.accept()
    (gap,) = h.gaps()
    assert gap == {
        "start": ms(lost),
        "end": ms(lost + 0.7),
        "cause": "close:1006",
        "recovered": 1,
        "attempts": 0,
        "detail": "EOF",
    }


def test_a_first_connection_is_a_gap_only_if_it_needed_retries() -> None:
    """Straight in: no gap. Two 401s first: a startup gap with attempts and the status."""
    h = Harness()
    h.start()
    h.accept()
    assert h.gaps() == []
    h = Harness()
    h.start()
    h.refuse(HandshakeRejected(401))
    h.advance(5_000)
    h.refuse(HandshakeRejected(401))
    h.advance(10_000)
    h.accept()
    (gap,) = h.gaps()
    assert (gap["cause"], gap["attempts"], gap["handshake"]) == ("startup", 2, "401")
    assert (gap["start"], gap["end"]) == (ms(0), ms(15.0))


def test_after_a_restart_the_first_connection_closes_a_restart_gap() -> None:
    """resume_from (where the previous run stopped receiving) to the first handshake: cause
    restart, even when the first attempt worked."""
    h = Harness(resume_from=BASE - 120.0)
    h.start()
    h.advance(300)
    h.accept()
    (gap,) = h.gaps()
    assert (gap["cause"], gap["recovered"]) == ("restart", 1)
    assert (gap["start"], gap["end"]) == (int((BASE - 120.0) * 1000), ms(0.3))


def test_a_stop_while_disconnected_records_the_open_gap_as_not_recovered() -> None:
    """Dropped, then stopped before reconnecting: the gap ends at the stop, recovered 0."""
    h = Harness()
    h.start()
    link = h.accept()
    h.eof(link)
    h.advance(200)
    h.rules.stop()
    h.run()
    (gap,) = h.gaps()
    assert (gap["cause"], gap["recovered"], gap["end"]) == ("close:1006", 0, ms(0.2))


# -- token expiry, may_connect ----------------------------------------------------------------


def test_token_expiry_is_warned_once_per_source_ahead_and_once_when_past(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token expiring in 10 min (warning at 15): one WARNING for two subscriptions of the
    source; after exp, one more; a 401 then says the claim expired."""
    caplog.set_level(logging.WARNING)
    name = f"exp-{uuid.uuid4().hex[:8]}"
    src = source(name, silence_timeout=0.0, ping_interval=3600.0)
    first, second = Harness(src), Harness(src, event="call.upsert")
    exp = BASE + 600.0
    first.token_exp = second.token_exp = exp
    for h in (first, second):
        h.start()
        h.accept(exp)
        assert h.stats.token_expires_at == exp
    assert sum("expires at" in r.getMessage() for r in caplog.records) == 1
    first.advance(660_000)  # the 5-min re-read at exp
    assert sum("expired at" in r.getMessage() for r in caplog.records) == 1
    link = next(iter(first.listening))
    first.eof(link)
    first.advance(500)
    first.refuse(HandshakeRejected(401))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors
    assert "exp claim says it expired" in errors[-1]


def test_may_connect_false_holds_every_attempt_until_permission_returns() -> None:
    """Not permitted: no Connect; permitted again: one at once; revoked while connected: the
    connection stays (a pending fleet handover), but once it ends there is no new attempt."""
    h = Harness(may_connect=False)
    h.start()
    assert h.connects == []
    h.advance(60_000)
    assert h.connects == []
    h.allowed = True
    h.rules.permission_changed()
    h.run()
    link = h.accept()
    h.allowed = False
    h.rules.permission_changed()
    h.run()
    assert h.sent(link) == []
    h.feed(link, frames_of(1, 2))
    assert h.frames() == [1, 2]
    h.eof(link)
    h.advance(60_000)
    assert h.connects == []
    h.allowed = True
    h.rules.permission_changed()
    h.run()
    assert len(h.connects) == 1


def test_the_fleet_lease_deadline_stops_the_subscription_on_the_loops_clock() -> None:
    """Fleet mode: at `lease_deadline` (monotonic) the connection is closed politely and no
    attempt follows, whatever the fleet thread does; frames before the echo are kept."""
    deadline = [5.0]
    h = Harness(lease_deadline=lambda: deadline[0])
    h.start()
    link = h.accept()
    h.advance(4_000)
    assert h.sent(link) == []
    deadline[0] = 8.0  # renewed
    h.advance(3_999)
    assert not h.finished()
    assert (Opcode.CLOSE, (1001).to_bytes(2, "big")) not in h.sent(link)
    h.advance(1)
    assert (Opcode.CLOSE, (1001).to_bytes(2, "big")) in h.sent(link)
    h.feed(link, frames_of(7) + ECHO_1000)
    assert h.frames() == [7]
    assert h.finished()
    h.advance(60_000)
    assert h.connects == []


def test_a_takeover_gap_has_the_cause_it_was_given() -> None:
    """resume_from with a fleet cause: the first connection closes a `failover` gap from the
    dead member's last heartbeat; each successful handshake is reported."""
    reports: list[int] = []
    h = Harness(
        resume_from=BASE - 4.0,
        resume_cause=("failover", "the lease of m1 ran out"),
        on_connected=lambda: reports.append(1),
    )
    h.start()
    h.accept()
    (gap,) = h.gaps()
    assert (gap["cause"], gap["detail"]) == ("failover", "the lease of m1 ran out")
    assert (gap["start"], gap["end"]) == (int((BASE - 4.0) * 1000), ms(0))
    assert reports == [1]


def test_resubscribe_at_opens_a_new_connection_before_closing_the_old_one() -> None:
    """A fleet re-subscribe (a called-off handover): at the given time a new connection is
    asked for while the old one is read; once it is up the old one is closed and drained."""
    h = Harness()
    h.start()
    old = h.accept()
    h.rules.resubscribe_at(3.0)
    h.advance(2_999)
    assert h.connects == []
    h.advance(1)
    assert len(h.connects) == 1
    h.feed(old, frames_of(1))
    new = h.accept()
    assert (Opcode.CLOSE, (1000).to_bytes(2, "big")) in h.sent(old)
    h.feed(old, frames_of(2) + ECHO_1000)
    h.feed(new, frames_of(3))
    assert h.frames() == [1, 2, 3]
    assert h.stats.resubscribes.get("fleet") == 1


# -- any input --------------------------------------------------------------------------------


def check_routed(entries: list[Entry]) -> None:
    """Every entry is either forwardable as is or a complete dead-letter entry."""
    for entry in entries:
        if entry.opcode == GAP:
            continue
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
@given(st.binary(max_size=3000), st.integers(1, 3000))
def test_arbitrary_bytes_from_the_server_never_raise(data: bytes, cut: int) -> None:
    """Any byte stream, in any two reads: entries that route cleanly, never an exception."""
    h = Harness(source(max_frame_bytes=1024))
    h.start()
    link = h.accept()
    h.feed(link, data[:cut])
    h.feed(link, data[cut:])
    h.eof(link)
    check_routed(h.entries)
    assert set(h.stats.close_codes) <= {"1006", "1002", "4xxx", "invalid"} | {
        str(c) for c in range(1000, 4000)
    }


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    h = Harness(source(max_frame_bytes=1024))
    h.start()
    link = h.accept()
    h.feed(link, b"".join(encode_frame(p, opcode) for p in payloads))
    assert link in h.listening
    assert len(h.entries) == len(payloads)
    for entry, payload in zip(h.entries, payloads, strict=True):
        if len(payload) > 1024:
            assert invalid_reason(entry.opcode, entry.payload) == "too_large"
        else:
            assert entry.payload == payload
    check_routed(h.entries)


def test_evidence_window_is_a_hundredth_of_the_silence_timeout_within_bounds() -> None:
    """W: 3 s for the 300 s default, never under 0.1 s nor over 30 s; 30 s without watchdog."""
    assert evidence_window(300.0) == 3.0
    assert evidence_window(1.0) == 0.1
    assert evidence_window(86400.0) == 30.0
    assert evidence_window(0.0) == 30.0
    assert EVIDENCE_FRAMES >= 3  # one API send can put two frames on messages.upsert


def test_backoff_policy_defaults_are_what_the_tests_assume() -> None:
    """The delays asserted above are the documented defaults of [sources.backoff]."""
    assert Backoff() == Backoff(initial=0.5, maximum=30.0, auth_initial=5.0, auth_maximum=300.0)
    assert Backoff().stable_after == 30.0


def test_masking_keys_are_fresh_per_frame_across_refills_and_threads() -> None:
    """Every client frame gets a new 4-byte key, also past the pool's refill, and two loop
    threads never share a pool (the keys come from os.urandom in 4 KiB draws)."""
    count = 3 * MASK_POOL_BYTES // 4  # three refills
    keys = [random_mask() for _ in range(count)]
    assert all(len(k) == 4 for k in keys)
    assert len(set(keys)) >= count - 2  # 2^32 keys: a repeat or two at most by chance
    other: list[bytes] = []
    thread = threading.Thread(target=lambda: other.extend(random_mask() for _ in range(200)))
    thread.start()
    thread.join(10.0)
    assert len(other) == 200
    assert len(set(other) & set(keys)) <= 2
