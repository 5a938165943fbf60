"""Log redaction: tokens never reach the log, even inside tracebacks."""

from __future__ import annotations

import io
import logging

from forwarder.logs import redact, setup_logging

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJpbnN0YW5jZU5hbWUiOiJjYW5hcnkifQ.c2VjcmV0LXNpZw"


def test_redact_patterns() -> None:
    """token= values, bare JWTs and URL passwords are replaced by ***."""
    assert redact(f"GET /ws/events?event=a&token={TOKEN} HTTP/1.1") == (
        "GET /ws/events?event=a&token=*** HTTP/1.1"
    )
    assert TOKEN not in redact(f"bad token {TOKEN}!")
    assert redact("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"


def test_handler_redacts_messages_args_and_tracebacks() -> None:
    """Whatever a library logs, the formatted output holds no token."""
    out = io.StringIO()
    setup_logging("DEBUG", out)
    logging.getLogger("websocket").warning("url %s", f"ws://h/ws/events?token={TOKEN}")
    try:
        raise ValueError(f"failed for {TOKEN}")
    except ValueError:
        logging.getLogger("x").exception("boom")
    text = out.getvalue()
    assert "token=***" in text
    assert "boom" in text
    assert TOKEN not in text
