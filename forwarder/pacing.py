"""How much the writer sends per script call and how long it waits for the reply.

Sans-I/O: the writer reports timeouts and replies, and applies what this object decides.
A timeout does not say whether Redis applied a batch or is only slow; re-sending the same
large batch with the same timeout can time out forever. So a timeout halves the batch size
and doubles the socket timeout (up to MAX_PATIENCE x socket_timeout); a reply that comes
within half of socket_timeout halves the timeout again, and GROW_AFTER such replies in a row
double the batch size, back up to batch_max. Growing on a slow reply would bring the next
timeout straight back, so slow replies change nothing.

Not thread-safe: the writer thread owns it.
"""

from __future__ import annotations

MAX_PATIENCE = 8.0  # the socket timeout grows up to this many socket_timeouts
GROW_AFTER = 8  # quick replies in a row before the batch size doubles


class Pacer:
    def __init__(self, batch_max: int, socket_timeout: float) -> None:
        self.batch_max = batch_max
        self.socket_timeout = socket_timeout
        self.limit = batch_max  # entries per call
        self.patience = 1.0  # socket timeout, in socket_timeouts
        self._quick = 0  # quick replies in a row since the last change

    @property
    def timeout(self) -> float:
        """The socket timeout to use now, in seconds."""
        return self.socket_timeout * self.patience

    def normal(self) -> bool:
        """Back to batch_max and the configured timeout."""
        return self.limit >= self.batch_max and self.patience <= 1.0

    def timed_out(self, size: int) -> None:
        """A call of `size` entries got no reply in time."""
        self.limit = max(1, min(self.limit, size) // 2)
        self.patience = min(MAX_PATIENCE, self.patience * 2.0)
        self._quick = 0

    def answered(self, elapsed: float) -> bool:
        """A call got its reply after `elapsed` seconds; True if the timeout changed."""
        if elapsed >= self.socket_timeout / 2:
            self._quick = 0
            return False
        if self.normal():
            return False
        self._quick += 1
        changed = self.patience > 1.0
        if changed:
            self.patience = max(1.0, self.patience / 2.0)
        if self._quick >= GROW_AFTER:
            self._quick = 0
            self.limit = min(self.batch_max, self.limit * 2)
        return changed
