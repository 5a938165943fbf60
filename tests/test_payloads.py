"""Payload builders: shapes and sizes per event (docs/upstream.md §2, §6), seq round trips."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder_sim import payloads

ARRAY_EVENTS = {"chats.upsert", "chats.update", "contacts.upsert", "groups.upsert", "groups.update"}


def _docs(event: str, n: int = 64, seed: int = 0) -> list[Any]:
    return [orjson.loads(payloads.build(event, seq, seed)) for seq in range(1, n + 1)]


def test_event_lists_match_upstream() -> None:
    """ALLOWED_EVENTS is upstream's 22-name ListEvents and SENT_EVENTS its 13 WS-emitted names."""
    assert len(payloads.ALLOWED_EVENTS) == 22
    assert len(set(payloads.ALLOWED_EVENTS)) == 22
    assert len(payloads.SENT_EVENTS) == 13
    assert set(payloads.SENT_EVENTS) <= set(payloads.ALLOWED_EVENTS)
    assert "messaging-history.set" not in payloads.ALLOWED_EVENTS
    assert "contacts.update" in set(payloads.ALLOWED_EVENTS) - set(payloads.SENT_EVENTS)


@pytest.mark.parametrize("event", payloads.ALLOWED_EVENTS)
def test_top_level_type_per_event(event: str) -> None:
    """Array events produce JSON arrays, every other event a JSON object."""
    expected = list if event in ARRAY_EVENTS else dict
    assert all(isinstance(doc, expected) for doc in _docs(event, 32))


@pytest.mark.parametrize("event", payloads.ALLOWED_EVENTS)
def test_build_is_compact_deterministic_and_seed_dependent(event: str) -> None:
    """build() is compact JSON, a pure function of (event, seq, seed), and varies with the seed."""
    one = payloads.build(event, 7, seed=1)
    assert one == payloads.build(event, 7, seed=1)
    assert orjson.dumps(orjson.loads(one)) == one
    assert b"\n" not in one
    assert {payloads.build(event, s, seed=1) for s in range(1, 30)} != {
        payloads.build(event, s, seed=2) for s in range(1, 30)
    }


def test_qrcode_updated_is_about_13_kb_with_a_real_png() -> None:
    """qrcode.updated carries count, a 2@ code and a ~13 KB PNG data URL that decodes as PNG."""
    for doc in _docs("qrcode.updated", 8):
        assert set(doc) - {"paringCode"} == {"count", "code", "base64"}
        assert doc["code"].startswith("2@")
        assert doc["code"].count(",") == 3
        prefix = "data:image/png;base64,"
        assert doc["base64"].startswith(prefix + "iVBORw0KGgo")
        png = base64.b64decode(doc["base64"][len(prefix) :])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert png[-12:-4] == b"\x00\x00\x00\x00IEND"
    sizes = [len(payloads.build("qrcode.updated", s)) for s in range(1, 20)]
    assert all(11_000 <= n <= 16_000 for n in sizes)


def test_messages_upsert_sizes_and_fields() -> None:
    """Text messages are 0.3-1.5 KB, media messages 2-15 KB, with upstream's flattened fields."""
    docs = _docs("messages.upsert", 200)
    sizes = {d["keyId"]: len(orjson.dumps(d)) for d in docs}
    text = [d for d in docs if d["messageType"] in ("conversation", "extendedTextMessage")]
    media = [d for d in docs if "jpegThumbnail" in d["content"]]
    assert text
    assert media
    assert all(300 <= sizes[d["keyId"]] <= 1500 for d in text)
    assert all(2000 <= sizes[d["keyId"]] <= 15000 for d in media)
    assert all(d["content"]["jpegThumbnail"].startswith("/9j/") for d in media)
    assert all(d["media"]["path"].startswith("/chat/public/") for d in media)
    for d in docs:
        assert {"keyId", "keyFromMe", "keyRemoteJid", "messageType", "content"} <= set(d)
        assert {"messageTimestamp", "instanceId", "device", "isGroup"} <= set(d)
        assert d["isGroup"] == d["keyRemoteJid"].endswith("@g.us")
        assert ("keyParticipant" in d) == d["isGroup"]
    api = [d for d in docs if d["keyFromMe"]]
    assert api
    assert all(d["device"] == "web" and "info" not in d for d in api)
    assert {d["info"]["type"] for d in docs if "info" in d} <= {"notify", "append"}


def test_connection_update_shape() -> None:
    """connection.update is {instance, state, statusReason} plus the documented _simSeq key."""
    doc = orjson.loads(payloads.build("connection.update", 3, instance="acme-support"))
    assert set(doc) == {"instance", "state", "statusReason", "_simSeq"}
    assert doc["instance"] == "acme-support"
    assert doc["state"] in ("open", "connecting", "close")


@pytest.mark.parametrize(
    ("event", "keys"),
    [
        ("messages.update", {"remoteJid", "fromMe", "id", "dateTime", "instanceId"}),
        ("send.message", {"keyId", "keyFromMe", "keyRemoteJid", "content", "device"}),
        ("presence.update", {"id", "presences"}),
        ("group-participants.update", {"id", "author", "participants", "action"}),
        ("call.upsert", {"chatId", "from", "id", "date", "status", "offline"}),
    ],
)
def test_object_event_fields(event: str, keys: set[str]) -> None:
    """Object events carry the upstream field names."""
    for doc in _docs(event, 16):
        assert keys <= set(doc)


@pytest.mark.parametrize(
    ("event", "keys"),
    [
        ("contacts.upsert", {"id", "remoteJid", "pushName", "profilePicUrl", "createdAt"}),
        ("chats.upsert", {"id", "remoteJid", "content", "createdAt", "updatedAt", "instanceId"}),
        ("chats.update", {"remoteJid", "instanceId", "content"}),
        ("groups.upsert", {"id", "subject", "owner", "creation", "participants"}),
        ("groups.update", {"id"}),
    ],
)
def test_array_event_items(event: str, keys: set[str]) -> None:
    """Array events hold items with the upstream row or Baileys fields; upserts hold one item."""
    for doc in _docs(event, 16):
        assert doc
        assert keys <= set(doc[0])
        if event in ("contacts.upsert", "chats.upsert"):
            assert len(doc) == 1


@pytest.mark.parametrize("event", payloads.ALLOWED_EVENTS)
def test_seq_of_round_trip_for_build(event: str) -> None:
    """seq_of() recovers the seq from build() output, including zero and large values."""
    for seq in (0, 1, 2, 99, 12345, 10**11):
        assert payloads.seq_of(event, payloads.build(event, seq, seed=3)) == seq


@settings(max_examples=200, deadline=None)
@given(
    event=st.sampled_from(payloads.ALLOWED_EVENTS),
    seq=st.integers(min_value=0, max_value=10**12 - 1),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_seq_of_round_trip_property(event: str, seq: int, seed: int) -> None:
    """For any event, seq and seed, seq_of(build(...)) returns the seq and the JSON is valid."""
    data = payloads.build(event, seq, seed)
    orjson.loads(data)
    assert payloads.seq_of(event, data) == seq


@settings(max_examples=200, deadline=None)
@given(
    event=st.sampled_from(payloads.ALLOWED_EVENTS),
    seq=st.integers(min_value=0, max_value=10**12 - 1),
    extra=st.integers(min_value=0, max_value=40_000),
)
def test_sized_is_exact_valid_and_carries_seq(event: str, seq: int, extra: int) -> None:
    """sized() returns valid UTF-8 JSON of exactly the requested size carrying the seq."""
    size = payloads.min_size(event) + extra
    data = payloads.sized(event, seq, size)
    assert len(data) == size
    data.decode("utf-8")
    orjson.loads(data)
    assert payloads.seq_of(event, data) == seq


def test_sized_300_bytes_for_common_events() -> None:
    """300-byte frames (the benchmark size) are possible for messages.upsert and other events."""
    for event in ("messages.upsert", "send.message", "messages.update", "contacts.upsert"):
        assert len(payloads.sized(event, 42, 300)) == 300
    factory = payloads.sized_factory("messages.upsert", 300)
    assert factory(5) == payloads.sized("messages.upsert", 5, 300)


def test_invalid_arguments_raise() -> None:
    """Unknown events, negative seqs and too-small sizes are rejected with ValueError."""
    with pytest.raises(ValueError, match="unknown event"):
        payloads.build("messaging-history.set", 1)
    with pytest.raises(ValueError, match="out of range"):
        payloads.build("messages.upsert", -1)
    with pytest.raises(ValueError, match="below the minimum"):
        payloads.sized("messages.upsert", 1, 10)
