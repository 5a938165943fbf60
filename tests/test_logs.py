"""Log redaction: tokens never reach the log, even inside tracebacks."""

from __future__ import annotations

import io
import logging

from forwarder.config import redact_url
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
    logging.getLogger("some.library").warning("url %s", f"ws://h/ws/events?token={TOKEN}")
    try:
        raise ValueError(f"failed for {TOKEN}")
    except ValueError:
        logging.getLogger("x").exception("boom")
    text = out.getvalue()
    assert "token=***" in text
    assert "boom" in text
    assert TOKEN not in text


def test_messages_about_urls_use_the_same_rules_as_the_log_filter() -> None:
    """redact_url (used in errors, /status, the start line) hides all the filter hides."""
    for text in (
        f"ws://h:8084/ws/events?event=a&token={TOKEN}",
        f"wss://h/{TOKEN}/ws/events",  # a token pasted into the path
        "rediss://user:hunter2@h:6380/0",
    ):
        assert redact_url(text) == redact(text)
        assert TOKEN not in redact_url(text)
        assert "hunter2" not in redact_url(text)
