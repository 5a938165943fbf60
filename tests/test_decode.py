"""Frame validation: what is forwarded and what is dead-lettered, and why."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forwarder import decode
from forwarder.frames import Opcode, Oversized


@pytest.mark.parametrize(
    ("opcode", "payload", "reason"),
    [
        (Opcode.TEXT, b'{"instance":"a","state":"open","statusReason":200}', None),
        (Opcode.TEXT, b'[{"remoteJid":"1@s.whatsapp.net"}]', None),
        (Opcode.TEXT, b"not json", decode.INVALID_JSON),
        (Opcode.TEXT, b'{"a":"\xff\xfe"}', decode.INVALID_UTF8),
        (Opcode.TEXT, b"[" * 2000 + b"]" * 2000, decode.TOO_DEEP),
        (Opcode.TEXT, b'"just a string"', decode.NOT_CONTAINER),
        (Opcode.TEXT, b"NaN", decode.INVALID_JSON),
        (Opcode.BINARY, b"{}", decode.BINARY),
        (Opcode.TEXT, Oversized(Opcode.TEXT, 10, b"x", "00"), decode.TOO_LARGE),
        (Opcode.TEXT, b"[" + b"9" * 40 + b"]", None),
        (Opcode.TEXT, b"[" + b"9" * 5000 + b"]", decode.NUMBER_TOO_LARGE),
    ],
)
def test_reasons(opcode: int, payload: bytes | Oversized, reason: str | None) -> None:
    """Objects and arrays pass; everything else gets a specific reason."""
    assert decode.invalid_reason(opcode, payload) == reason


@given(st.binary(max_size=500), st.sampled_from([Opcode.TEXT, Opcode.BINARY]))
def test_any_bytes_get_a_verdict_without_raising(payload: bytes, opcode: int) -> None:
    """Arbitrary frames are classified; no exception escapes."""
    assert decode.invalid_reason(opcode, payload) in (None, *decode.REASONS)
