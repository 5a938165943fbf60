"""systemd's notification protocol (sd_notify), in pure Python.

Under ``Type=notify`` systemd passes an AF_UNIX datagram socket in ``NOTIFY_SOCKET`` and waits
for ``READY=1`` before it considers the unit started; ``WatchdogSec=`` adds ``WATCHDOG_USEC``
and expects ``WATCHDOG=1`` at least that often, or kills and restarts the unit.

How the daemon uses it (see README, "Running under systemd"):
    READY=1      once the configuration, the spool and the metrics endpoint are up; never
                 gated on the upstream, or an upstream outage would become a start-timeout
                 restart loop.
    STATUS=...   one line, e.g. ``12/13 subscriptions connected, spool 0`` (`format_status`).
    WATCHDOG=1   every `watchdog_interval()` seconds, and only while the subscriber and writer
                 threads make progress: a wedged thread then gets the unit restarted.
    STOPPING=1   when SIGTERM arrives, before the drain.

Without ``NOTIFY_SOCKET`` (not under systemd, or another ``Type=``) every call is a no-op
that returns False, so callers never need to check.

The wire format (sd_notify(3)): one datagram per call, newline-separated ``KEY=VALUE``
assignments, no trailing newline; an address starting with ``@`` is in the abstract
namespace (a leading NUL byte). systemd checks the sender's PID against the main PID
(``NotifyAccess=main``); every thread of this process has that PID.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

# A notification must never hold up its caller (the watchdog loop, the shutdown path) for
# long: if systemd's receive queue is full, give up after this many seconds.
SEND_TIMEOUT = 1.0

_KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


class Notifier:
    """Sends sd_notify datagrams to one address; a no-op when the address is None.

    Contract:
        - Every method returns True when the datagram was handed to the kernel, False when
          there is no socket (not under systemd) or the send failed.
        - Sending never raises: failures are logged at DEBUG (systemd may be re-executing,
          or the unit is not Type=notify) and reported by the return value. Only a
          programming error (a lowercase key, a newline in a value given to `send`) raises
          ValueError.
        - Thread-safe: any thread may call any method; one socket is shared under a lock.
    """

    def __init__(self, address: str | None) -> None:
        """`address` as found in NOTIFY_SOCKET: an absolute path, or ``@name`` (abstract)."""
        self._address: str | None = None
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._closed = False
        if not address:
            return
        if address.startswith("@"):
            # The kernel's abstract namespace: the name starts with a NUL byte.
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        else:
            # e.g. systemd >= 253's "vsock:CID:PORT" (VMs): not needed for a host service.
            log.warning("NOTIFY_SOCKET %r is not a path or @name: not notifying systemd", address)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Notifier:
        """The notifier for ``environ["NOTIFY_SOCKET"]``; a no-op one if it is unset or empty."""
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify (i.e. we run under systemd Type=notify)."""
        return self._address is not None and not self._closed

    def ready(self) -> bool:
        """``READY=1``: startup finished; systemd now runs ``After=`` units."""
        return self.send(READY=1)

    def status(self, text: str) -> bool:
        """``STATUS=text``, shown by ``systemctl status``; whitespace runs become one space."""
        return self.send(STATUS=" ".join(text.split()))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: we are alive; send every `watchdog_interval()` seconds."""
        return self.send(WATCHDOG=1)

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown began; systemd shows the unit as deactivating."""
        return self.send(STOPPING=1)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (required by systemd >= 253); send
        `ready()` again when the reload is done."""
        return self.send(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: during a long start or drain, ask systemd for `seconds`
        more before its start/stop timeout fires."""
        return self.send(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def send(self, **fields: str | int) -> bool:
        """Send the assignments ``KEY=value`` (in argument order) as one datagram.

        Raises ValueError for a key that is not upper case (``ready=1`` is a typo that
        systemd would silently ignore) or a value containing a newline (it would start
        another assignment).
        """
        lines = []
        for key, value in fields.items():
            text = str(value)
            if not _KEY_RE.match(key):
                raise ValueError(f"sd_notify keys are upper case: {key!r}")
            if "\n" in text:
                raise ValueError(f"sd_notify value of {key} contains a newline")
            lines.append(f"{key}={text}")
        if not lines or self._address is None:
            return False
        message = "\n".join(lines).encode("utf-8")
        with self._lock:
            if self._closed:
                return False
            try:
                if self._socket is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.settimeout(SEND_TIMEOUT)
                    self._socket = sock
                self._socket.sendto(message, self._address)
            except OSError as exc:
                # Expected when systemd is re-executing or the unit is not Type=notify;
                # the caller has nothing to do about it, so no noise above DEBUG.
                log.debug("sd_notify %s failed: %s", lines[0].split("=", 1)[0], exc)
                return False
        return True

    def close(self) -> None:
        """Release the socket; later calls return False. Idempotent."""
        with self._lock:
            self._closed = True
            if self._socket is not None:
                self._socket.close()
                self._socket = None


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when systemd expects none.

    systemd sets ``WATCHDOG_USEC`` (the ``WatchdogSec=`` period in microseconds) and, since
    it may be inherited by children, ``WATCHDOG_PID``: when that is set and is not our PID
    (`pid`, default ``os.getpid()``), the watchdog is not ours. Returns half the period, as
    sd_watchdog_enabled(3) recommends, so one late ping does not kill the unit. A missing,
    malformed or non-positive value means no watchdog.
    """
    raw = environ.get("WATCHDOG_USEC", "").strip()
    if not raw.isdigit() or int(raw) <= 0:
        return None
    owner = environ.get("WATCHDOG_PID", "").strip()
    me = os.getpid() if pid is None else pid
    if owner and (not owner.isdigit() or int(owner) != me):
        return None
    return int(raw) / 1_000_000 / 2


def format_status(connected: int, total: int, pending: int, redis_ok: bool) -> str:
    """The STATUS= line: ``12/13 subscriptions connected, spool 0``, plus ``, Redis not
    answering`` when the writer has not heard from Redis recently."""
    text = f"{connected}/{total} subscriptions connected, spool {pending}"
    if not redis_ok:
        text += ", Redis not answering"
    return text
