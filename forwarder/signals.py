"""Signals that arrive while `forwarder run` is still starting.

Python's default for SIGTERM and SIGHUP is to kill the process (exit -15, -1), and SIGINT
raises KeyboardInterrupt wherever the main thread happens to be. Starting takes a noticeable
time (importing redis-py, h11 and prometheus-client, reading the configuration,
opening the spool), and `systemctl stop` or `reload` can come at any moment of it. So
`forwarder run` installs these handlers as its first action, before any of that, and
`Forwarder.run()` takes over what they recorded when it installs its own:

- SIGTERM or SIGINT: stop. The daemon then exits 0 without starting anything, so it never
  connects (a connection would take the upstream's single slot from whoever holds it).
  A second one exits at once with code 130, as during a shutdown.
- SIGHUP: the configuration may have changed after it was read: the daemon reloads it once
  it runs.

The handlers only set flags, read later by the main thread (handlers also run in the main
thread, so no lock is needed).
"""

from __future__ import annotations

import os
import signal
from types import FrameType

from forwarder.errors import ExitCode

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RELOAD_SIGNAL = signal.SIGHUP


class StartupSignals:
    """Records stop and reload requests until the daemon's own handlers replace these."""

    def __init__(self) -> None:
        self.stop_requested = False
        self.reload_requested = False

    def install(self) -> StartupSignals:
        """Install the handlers (main thread only); returns self."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop)
        signal.signal(RELOAD_SIGNAL, self._on_reload)
        return self

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_requested:
            os.write(2, b"forwarder: second signal, exiting at once\n")
            os._exit(ExitCode.FORCED)
        self.stop_requested = True

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
