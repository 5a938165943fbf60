"""Logging policy and secret hygiene.

Policy: INFO for lifecycle (start, stop, connect, reconnect), WARNING for failures that the
daemon handles by itself, ERROR for what needs a human (bad token, full buffer, Redis refusing
writes); nothing per frame. Logs go to stderr, where journald collects them.

Every record passes a redacting filter on the handler, so a token cannot reach the log even
through a library's message or a traceback: `token=…` query values and anything shaped like
a JWT are replaced by ***.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import TextIO

_PATTERNS = (
    (re.compile(r"(?i)(token=)[^&\s\"'<>]+"), r"\1***"),
    # A JWT: base64url header starting {"  then payload and signature.
    (re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "***"),
    (re.compile(r"(://[^:/@\s]*:)[^@/\s]+(@)"), r"\1***\2"),  # URL passwords
)


def redact(text: str) -> str:
    """Replace every token-looking substring of `text` with ***."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message and traceback with secrets removed."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def setup_logging(level: str, stream: TextIO | None = None) -> logging.Handler:
    """Send all logging to `stream` (stderr) through the redacting filter; returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        # journald adds its own timestamp and unit name.
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
