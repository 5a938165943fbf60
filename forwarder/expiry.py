"""Token expiry: the `exp` claim of a subscription's token, and the warnings about it.

The upstream checks a token's expiry only at the upgrade: an open connection survives it, the
next reconnect gets HTTP 401. So forwarder reads the claim (without verifying the token: it
does not know the secret) at every connection and every TOKEN_CHECK_INTERVAL (5 min) while
connected,
exports it, and warns `token_expiry_warning` ahead and once it has passed: one WARNING per
source and stage, however many of its subscriptions (and loops) read the token.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable

from forwarder.config import SourceConfig
from forwarder.errors import ConfigError
from forwarder.gaps import utc
from forwarder.stats import SubscriptionStats

log = logging.getLogger(__name__)

# Re-read the token's exp claim this often while connected (each subscription of a source
# does; their reads share a cache): warnings come at most this much late.
TOKEN_CHECK_INTERVAL = 300.0

_lock = threading.Lock()
_warned: dict[tuple[str, str], tuple[float, str]] = {}  # (source, token origin) -> (exp, stage)


class ExpiryWatch:
    """The token expiry state of one subscription. Not thread-safe (its loop's)."""

    def __init__(
        self,
        source: SourceConfig,
        stats: SubscriptionStats,
        read: Callable[[], float | None],
    ) -> None:
        """`read`: the current token's exp claim; may raise ConfigError."""
        self._source = source
        self._stats = stats
        self._read = read
        self.next_check = math.inf  # monotonic

    def token_used(self, exp: float | None, now: float, wall: float) -> None:
        """A connection attempt read the token; `exp` is its claim."""
        self._stats.token_expires_at = exp
        self.next_check = now + TOKEN_CHECK_INTERVAL
        self._warn(wall)

    def check(self, now: float, wall: float) -> None:
        """While connected: re-read the token (a rotated file) and warn ahead of its expiry."""
        self.next_check = now + TOKEN_CHECK_INTERVAL
        with contextlib.suppress(ConfigError):  # the next connection attempt reports it
            self._stats.token_expires_at = self._read()
        self._warn(wall)

    def expired_note(self, wall: float) -> str:
        """For a 401's ERROR line: whether the token's own claim says it expired."""
        exp = self._stats.token_expires_at
        if exp is None or exp > wall:
            return ""
        return f" (this token's exp claim says it expired at {utc(exp)})"

    def _warn(self, wall: float) -> None:
        source = self._source
        exp = self._stats.token_expires_at
        if exp is None or source.token_expiry_warning <= 0:
            return
        left = exp - wall
        if left > source.token_expiry_warning:
            return
        stage = "expired" if left <= 0 else "soon"
        with _lock:
            key = (source.name, source.token.origin)
            if _warned.get(key) in ((exp, stage), (exp, "expired")):
                return
            _warned[key] = (exp, stage)
        if stage == "soon":
            log.warning(
                "source %s: the token (%s) expires at %s, in %.0f min. Open connections "
                "survive it, but every reconnect after it is rejected with HTTP 401: refresh it "
                "(PUT /instance/refreshToken/{instance}) and write the new one to the token file",
                source.name,
                source.token.origin,
                utc(exp),
                left / 60.0,
            )
        else:
            log.warning(
                "source %s: the token (%s) expired at %s. Reconnects will be rejected with HTTP "
                "401 unless the server ignores expiry (AUTHENTICATION_JWT_EXPIRES_IN=0): "
                "refresh it and write the new one to the token file",
                source.name,
                source.token.origin,
                utc(exp),
            )
