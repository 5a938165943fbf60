"""Frame validation: is this frame a JSON object or array we can forward as is?

Pure and exception-free by contract: any input yields either None (forward it) or a short
reason (dead-letter it). The frame's bytes are stored unchanged either way.
"""

from __future__ import annotations

import orjson

from forwarder.frames import Opcode, Oversized

# Reasons, also the values of the `reason` label of forwarder_invalid_messages_total.
BINARY = "binary"
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
TOO_DEEP = "too_deep"
NOT_CONTAINER = "not_object_or_array"
NUMBER_TOO_LARGE = "number_too_large"  # valid JSON, but beyond a double (and Python's int limit)
TOO_LARGE = "too_large"
REASONS = (
    BINARY,
    INVALID_UTF8,
    INVALID_JSON,
    TOO_DEEP,
    NOT_CONTAINER,
    NUMBER_TOO_LARGE,
    TOO_LARGE,
)


def invalid_reason(opcode: int, payload: bytes | Oversized) -> str | None:
    """None if `payload` is a text frame holding one JSON object or array, else why not."""
    if isinstance(payload, Oversized):
        return TOO_LARGE
    if opcode != Opcode.TEXT:
        return BINARY
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return INVALID_UTF8
        message = str(exc)
        if "depth" in message or "recursion" in message.lower():
            return TOO_DEEP
        if "infinity" in message:
            return NUMBER_TOO_LARGE
        return INVALID_JSON
    except (RecursionError, MemoryError):  # belt and braces: orjson limits depth itself
        return TOO_DEEP
    if isinstance(value, dict | list):
        return None
    return NOT_CONTAINER
